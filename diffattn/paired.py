"""Paired runs: two models that differ in one thing only, trained on identical batches.

    run_paired(cfg, tcfg, data, backend)   DIFF (cfg) vs its vanilla twin, paired init
    run_agree(cfg, tcfg, data)             the same model on MLX and on PyTorch, CPU float32

Paired init: `params.init_params(cfg, seed)` draws every tensor from a stream keyed by its
name, so the two variants share every tensor they have in common byte for byte. That is
checked here, not assumed: on the arrays drawn, and again on the state each backend holds
after building its model (step 0), and the result is written to the manifest.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffattn import harness, optim, packing
from diffattn.config import ConfigError, ModelConfig, TrainConfig
from diffattn.conformance import rel_err
from diffattn.params import init_params, shared_names

# Cross-stack tolerances on CPU float32 (accumulation-order differences only): logits are
# O(1) values from O(100)-term float32 sums, ~1e-6 relative apart; the loss after 50 AdamW
# steps drifts more, as rounding differences are amplified by the updates.
AGREE_LOGITS_REL = 1e-5
AGREE_LOSS_ABS = 1e-4


def byte_identical(a: dict, b: dict, names) -> list[str]:
    """Names among `names` whose arrays differ in dtype, shape or any byte."""
    return [n for n in names if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
            or a[n].tobytes() != b[n].tobytes()]


def _twin(cfg: ModelConfig) -> ModelConfig:
    if cfg.attention == "vanilla":
        raise ConfigError("paired runs compare a DIFF model with its vanilla twin: give --attention diff or diff_v2")
    return cfg.twin("vanilla")


def run_paired(cfg: ModelConfig, tcfg: TrainConfig, data, backend, out_dir=None, *,
               budget_s: float | None = None, progress: bool = True) -> dict:
    """Train cfg (diff or diff_v2) and its vanilla twin from paired init on the same batches.
    Returns {"diff": summary, "vanilla": summary, "delta": {...}, "shared": {...}}; the deltas
    are DIFF minus vanilla (negative: DIFF is better)."""
    twin = _twin(cfg)
    data = packing.for_run(data, tcfg)  # packed once for both
    if out_dir is not None:
        for sub in ("diff", "vanilla"):
            harness.prepare_out_dir(Path(out_dir) / sub, resume=False)
        if (Path(out_dir) / "paired.json").exists():
            raise ConfigError(f"--out {out_dir}: already holds a paired run; choose another folder")
    p_diff, p_van = init_params(cfg, tcfg.seed), init_params(twin, tcfg.seed)
    names = shared_names(p_diff, p_van)
    drawn_diff = byte_identical(p_diff, p_van, names)
    # the same check on what each backend holds at step 0 (after its dtype conversion)
    held_diff = backend.build(cfg, p_diff, **optim.build_options(tcfg)).state()[0]
    held_van = backend.build(twin, p_van, **optim.build_options(tcfg)).state()[0]
    held = byte_identical(held_diff, held_van, names)
    shared = {"names": names, "count": len(names),
              "bytes": int(sum(p_diff[n].nbytes for n in names)),
              "byte_identical_at_init": not drawn_diff, "byte_identical_in_backend_at_step0": not held,
              "differing": sorted(set(drawn_diff) | set(held)),
              "diff_only": sorted(set(p_diff) - set(names)), "vanilla_only": sorted(set(p_van) - set(names))}
    if drawn_diff or held:
        raise RuntimeError(f"paired init broken: shared tensors differ at step 0: {shared['differing'][:3]}")
    runs = {}
    for label, c, p in (("diff", cfg, p_diff), ("vanilla", twin, p_van)):
        sub = Path(out_dir) / label if out_dir is not None else None
        runs[label] = harness.train(c, tcfg, data, backend, sub, params=p, budget_s=budget_s, progress=progress,
                                    extra_manifest={"paired": {"role": label, "shared_tensors": len(names)}})
    d, v = runs["diff"], runs["vanilla"]
    delta = {"val_loss": d["val_loss"] - v["val_loss"],
             "val_bpb": (d["val_bpb"] - v["val_bpb"]) if d["val_bpb"] is not None else None,
             "loss_by_position": (np.array(d["loss_by_position"]) - np.array(v["loss_by_position"])).tolist(),
             "accuracy": (d["accuracy"] - v["accuracy"]) if d["accuracy"] is not None else None}
    result = {"attention": cfg.attention, "diff": _brief(d), "vanilla": _brief(v), "delta": delta,
              "position_bins": d["position_bins"], "shared": shared, "steps": d["steps"],
              "backend": backend.name, "data": d["data"], "optimizer": tcfg.optimizer, "packing": tcfg.packing}
    if out_dir is not None:
        harness._write_json(Path(out_dir) / "paired.json", {
            **result, "model_config": harness.config_dict(cfg), "twin_config": harness.config_dict(twin),
            "train_config": harness.config_dict(tcfg), "env": harness.environment(backend),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return result


def _brief(summary: dict) -> dict:
    keep = ("val_loss", "val_bpb", "accuracy", "answer_loss", "loss_by_position", "train_loss", "tokens_per_s",
            "mfu", "train_seconds", "params", "out_dir")
    return {k: summary[k] for k in keep}


def format_paired(r: dict) -> str:
    d, v, delta = r["diff"], r["vanilla"], r["delta"]
    lines = [f"paired run: {r['attention']} vs vanilla twin, {r['steps']} {r['optimizer']} steps on {r['data']} "
             f"({r['packing']} batches, {r['backend']}); {r['shared']['count']} shared tensors byte-identical at step 0",
             f"{'':22s}{r['attention']:>12s}{'vanilla':>12s}{'delta':>12s}",
             f"{'val loss (nats/token)':22s}{d['val_loss']:12.4f}{v['val_loss']:12.4f}{delta['val_loss']:+12.4f}"]
    if delta["val_bpb"] is not None:
        lines.append(f"{'val bpb':22s}{d['val_bpb']:12.4f}{v['val_bpb']:12.4f}{delta['val_bpb']:+12.4f}")
    if delta["accuracy"] is not None:
        lines.append(f"{'answer accuracy':22s}{d['accuracy']:12.4f}{v['accuracy']:12.4f}{delta['accuracy']:+12.4f}")
    for (lo, hi), a, b, dd in zip(r["position_bins"], d["loss_by_position"], v["loss_by_position"],
                                  delta["loss_by_position"]):
        lines.append(f"{f'  loss @ pos {lo}-{hi - 1}':22s}{a:12.4f}{b:12.4f}{dd:+12.4f}")
    return "\n".join(lines)


# ---- cross-stack agreement ------------------------------------------------------------------

def run_agree(cfg: ModelConfig, tcfg: TrainConfig, data, backends=("mlx", "cuda"), *, log=None) -> dict:
    """The same initial weights and batches on two backends (CPU, float32): relative error of
    the logits at init, and |loss_a - loss_b| at every step of tcfg.steps AdamW updates.
    `backends` are names (loaded on the CPU in float32) or loaded Backend objects."""
    from diffattn.backend import load

    data = packing.for_run(data, tcfg)
    data.check(tcfg.seq_len)
    loaded = [load(b, device="cpu", dtype="float32") if isinstance(b, str) else b for b in backends]
    params = init_params(cfg, tcfg.seed)
    models = [b.build(cfg, params, **optim.build_options(tcfg)) for b in loaded]
    probe = data.val_batches(tcfg.batch_size, tcfg.seq_len, 1, tcfg.data_seed)[0][0][:, :-1]
    logits = [np.asarray(m.logits(probe)) for m in models]
    logits_rel = rel_err(logits[0], logits[1])
    rows = []
    for step in range(tcfg.steps):
        batch = data.train_batch(step, tcfg.batch_size, tcfg.seq_len, tcfg.grad_accum, tcfg.data_seed)
        batch = batch[0] if tcfg.grad_accum == 1 else batch
        lr = optim.lr_at(step, tcfg)
        a, b = (float(m.train_step(batch, lr)) for m in models)
        rows.append({"step": step, "loss_a": a, "loss_b": b, "abs_diff": abs(a - b)})
        if log is not None:
            log(rows[-1])
    max_diff = max(r["abs_diff"] for r in rows) if rows else 0.0
    params_rel = {}
    finals = [m.state()[0] for m in models]
    for n in finals[0]:
        params_rel[n] = rel_err(finals[0][n], finals[1][n]) if np.linalg.norm(finals[1][n]) else 0.0
    return {"backends": [b.name for b in loaded], "devices": [b.device for b in loaded],
            "dtypes": [b.dtype for b in loaded], "steps": tcfg.steps, "attention": cfg.attention,
            "optimizer": tcfg.optimizer, "packing": tcfg.packing,
            "logits_rel_err": logits_rel, "max_abs_loss_diff": max_diff,
            "max_params_rel_err": max(params_rel.values()),
            "logits_tol": AGREE_LOGITS_REL, "loss_tol": AGREE_LOSS_ABS,
            "ok": bool(logits_rel <= AGREE_LOGITS_REL and max_diff <= AGREE_LOSS_ABS), "per_step": rows}


def format_agree(r: dict) -> str:
    a, b = r["backends"]
    lines = [f"agreement {a} vs {b} ({r['dtypes'][0]}/{r['dtypes'][1]} on {r['devices'][0]}/{r['devices'][1]}), "
             f"{r['attention']}, {r['steps']} {r['optimizer']} steps, {r['packing']} batches",
             f"{'step':>6s}{'loss ' + a:>16s}{'loss ' + b:>16s}{'|diff|':>12s}"]
    rows = r["per_step"]
    show = rows if len(rows) <= 12 else rows[:5] + [None] + rows[-5:]
    for row in show:
        lines.append("   ..." if row is None else
                     f"{row['step']:6d}{row['loss_a']:16.8f}{row['loss_b']:16.8f}{row['abs_diff']:12.2e}")
    lines.append(f"logits at init: relative error {r['logits_rel_err']:.2e} (tolerance {r['logits_tol']:.0e})")
    lines.append(f"loss: max |{a} - {b}| over {r['steps']} steps {r['max_abs_loss_diff']:.2e} nats "
                 f"(tolerance {r['loss_tol']:.0e})")
    lines.append(f"params after training: max relative error {r['max_params_rel_err']:.2e}")
    lines.append("AGREE" if r["ok"] else "DISAGREE")
    return "\n".join(lines)

