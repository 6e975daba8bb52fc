"""Paired runs: two models that differ in one thing only, trained on identical batches.

    run_paired(cfg, tcfg, data, backend, out, seeds=[0, 1, 2])   DIFF (cfg) vs its vanilla twin
    run_agree(cfg, tcfg, data)             the same model on MLX and on PyTorch, CPU float32

Each seed trains a pair of twins. Paired init: `params.init_params(cfg, seed)` draws every
tensor from a stream keyed by its name, so the two variants share every tensor they have in
common byte for byte. That is checked here, not assumed: on the arrays drawn, and again on the
state each backend holds after building its model (step 0); the result goes to
seed_S/shared.json. Both arms of a seed read the same batches: the stream of data_seed, which is
the seed itself unless one data_seed is given for all seeds. So by default the data order varies
with the seed, and the spread over seeds (and the interval) covers data-order noise as well as
init noise; a fixed data_seed isolates init noise.

A run folder holds seed_S/{diff,vanilla}/ (ordinary run folders, plus arm.json once an arm has
finished: its summary and evals), seed_S/shared.json, and paired.json: per seed the deltas DIFF
minus vanilla (val loss in nats, bpb, per position bin, per eval) and over seeds their mean,
sample std and 95% intervals (diffattn.stats). paired.json is rewritten after every seed.
Both arms of every seed train under one recipe, tcfg's optimizer (adamw | muon) and packing
(random | bos-best-fit); both files record them, and a resumed seed refuses another recipe.

Resume (resume=True): a finished arm is read back from its arm.json, an arm with a checkpoint
continues from it through the harness's exact resume, and an arm killed before its first
checkpoint starts again. All arms run in one process, one after another, each model built anew:
the CUDA backend's torch.compile caches are per code object and keyed on shapes, so only the
first seed's two arms compile; every later seed reuses them. (CUDA graphs are recorded per model,
a few steps each.)
"""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffattn import harness, optim, packing, runfolder, stats
from diffattn.config import ConfigError, ModelConfig, TrainConfig
from diffattn.conformance import rel_err
from diffattn.params import init_params, shared_names

# Cross-stack tolerances on CPU float32 (accumulation-order differences only): logits are
# O(1) values from O(100)-term float32 sums, ~1e-6 relative apart; the loss after 50 AdamW
# steps drifts more, as rounding differences are amplified by the updates.
AGREE_LOGITS_REL = 1e-5
AGREE_LOSS_ABS = 1e-4
ARMS = ("diff", "vanilla")


def byte_identical(a: dict, b: dict, names) -> list[str]:
    """Names among `names` whose arrays differ in dtype, shape or any byte."""
    return [n for n in names if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
            or a[n].tobytes() != b[n].tobytes()]


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> 0..7, '0,3,5' -> [0, 3, 5], '0-2,9' -> [0, 1, 2, 9]; no repeats."""
    seeds = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected seeds like 0-7 or 0,3,5") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct non-negative seeds, like 0-7 or 0,3,5")
    return seeds


def _twin(cfg: ModelConfig) -> ModelConfig:
    if cfg.attention == "vanilla":
        raise ConfigError("paired runs compare a DIFF model with its vanilla twin: give --attention diff or diff_v2")
    return cfg.twin("vanilla")


def check_shared_init(cfg: ModelConfig, twin: ModelConfig, tcfg: TrainConfig, backend) -> dict:
    """The tensors the twins share, byte-identical as drawn and as each backend holds them at step 0."""
    p_diff, p_van = init_params(cfg, tcfg.seed), init_params(twin, tcfg.seed)
    names = shared_names(p_diff, p_van)
    drawn_diff = byte_identical(p_diff, p_van, names)
    # the same check on what each backend holds at step 0 (after its dtype conversion)
    held_diff = backend.build(cfg, p_diff, **optim.build_options(tcfg)).state()[0]
    held_van = backend.build(twin, p_van, **optim.build_options(tcfg)).state()[0]
    held = byte_identical(held_diff, held_van, names)
    shared = {"seed": tcfg.seed, "optimizer": tcfg.optimizer, "packing": tcfg.packing,
              "names": names, "count": len(names),
              "bytes": int(sum(p_diff[n].nbytes for n in names)),
              "byte_identical_at_init": not drawn_diff, "byte_identical_in_backend_at_step0": not held,
              "differing": sorted(set(drawn_diff) | set(held)),
              "diff_only": sorted(set(p_diff) - set(names)), "vanilla_only": sorted(set(p_van) - set(names))}
    if drawn_diff or held:
        raise RuntimeError(f"paired init broken: shared tensors differ at step 0: {shared['differing'][:3]}")
    return shared


def _evals(records) -> list[dict]:
    """Eval records by step, the last of each step (a resumed arm may evaluate its last step twice)."""
    by_step = {r["step"]: r for r in records if r.get("kind") == "eval"}
    return [by_step[s] for s in sorted(by_step)]


def _read_evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return _evals(records)


def _brief(summary: dict) -> dict:
    keep = ("steps", "tokens", "stopped", "val_loss", "val_bpb", "accuracy", "answer_loss", "loss_by_position",
            "position_bins", "train_loss", "tokens_per_s", "mfu", "train_seconds", "wall_seconds", "params",
            "out_dir", "resumed_from")
    return {k: summary[k] for k in keep}


def _run_arm(label, cfg, tcfg, data, backend, arm_dir, budget_s, progress, shared_count) -> dict:
    """One arm: {"summary", "evals"}, trained now, continued from its checkpoint, or read back."""
    extra = {"paired": {"role": label, "shared_tensors": shared_count}}
    if arm_dir is None:
        records = []
        s = harness.train(cfg, tcfg, data, backend, None, budget_s=budget_s, progress=progress,
                          extra_manifest=extra, log=records.append)
        return {"summary": _brief(s), "evals": _evals(records)}
    want = json.loads(json.dumps({"model_config": harness.config_dict(cfg), "train_config": harness.config_dict(tcfg),
                                  "data": data.describe(), "budget_s": budget_s}))  # as arm.json reads back
    record_path = arm_dir / "arm.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if all(record.get(k) == v for k, v in want.items()):
            return record
    # an arm killed while writing its step-0 checkpoint left only leftovers: harness.train clears them
    resume_from = arm_dir if (arm_dir / "checkpoints" / "latest.json").is_file() else None
    s = harness.train(cfg, tcfg, data, backend, arm_dir, resume_from=resume_from, budget_s=budget_s,
                      progress=progress, extra_manifest=extra)
    record = {**want, "summary": _brief(s), "evals": _read_evals(arm_dir) if _writes(backend) else []}
    if _writes(backend):
        runfolder.write_json(record_path, record)
    return record


def _writes(backend) -> bool:
    """Under --parallel only rank 0 writes (backends/*/parallel.py); a single process always does."""
    return getattr(backend, "is_writer", True)


def _delta(a, b):
    return None if a is None or b is None else a - b


def _seed_result(seed: int, tcfg: TrainConfig, arms: dict, shared: dict) -> dict:
    d, v = arms["diff"]["summary"], arms["vanilla"]["summary"]
    van_evals = {e["step"]: e for e in arms["vanilla"]["evals"]}
    evals = [{"step": e["step"], "val_loss": e["val_loss"] - van_evals[e["step"]]["val_loss"],
              "val_bpb": _delta(e["val_bpb"], van_evals[e["step"]]["val_bpb"])}
             for e in arms["diff"]["evals"] if e["step"] in van_evals]
    delta = {"val_loss": d["val_loss"] - v["val_loss"], "val_bpb": _delta(d["val_bpb"], v["val_bpb"]),
             "loss_by_position": (np.array(d["loss_by_position"]) - np.array(v["loss_by_position"])).tolist(),
             "accuracy": _delta(d["accuracy"], v["accuracy"])}
    return {"seed": seed, "data_seed": tcfg.data_seed, "diff": d, "vanilla": v, "delta": delta, "evals": evals,
            "shared": {k: shared[k] for k in ("count", "bytes", "byte_identical_at_init",
                                              "byte_identical_in_backend_at_step0")}}


def summarize_seeds(per_seed: list[dict]) -> dict:
    """Over seeds: the final deltas' statistics, per position bin, and per eval step all seeds share."""
    def over(key):
        values = [r["delta"][key] for r in per_seed]
        return None if any(x is None for x in values) else stats.summarize(values)

    common = set.intersection(*({e["step"] for e in r["evals"]} for r in per_seed))
    evals = []
    for step in sorted(common):
        at = [next(e for e in r["evals"] if e["step"] == step) for r in per_seed]
        bpb = [e["val_bpb"] for e in at]
        evals.append({"step": step, "val_loss": stats.summarize([e["val_loss"] for e in at]),
                      "val_bpb": None if None in bpb else stats.summarize(bpb)})
    return {"seeds": [r["seed"] for r in per_seed], "val_loss": over("val_loss"), "val_bpb": over("val_bpb"),
            "accuracy": over("accuracy"),
            "loss_by_position": stats.summarize_columns([r["delta"]["loss_by_position"] for r in per_seed]),
            "evals": evals}


def _check_paired_out(out: Path, resume: bool) -> None:
    """A paired run owns its folder: never inside a train run, and over another paired run only
    when resuming it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if (out / "run.json").exists() or (out / "checkpoints").exists():
        raise ConfigError(f"--out {out}: holds a train run; choose another folder for the paired run")
    if not resume and ((out / "paired.json").exists() or any(out.glob("seed_*"))):
        raise ConfigError(f"--out {out}: already holds a paired run; pass --resume to continue it or choose "
                          "another folder")


def run_paired(cfg: ModelConfig, tcfg: TrainConfig, data, backend, out_dir=None, *, seeds=None,
               data_seed: int | None = None, resume: bool = False, budget_s: float | None = None,
               progress: bool = True) -> dict:
    """Train cfg (diff or diff_v2) and its vanilla twin from paired init on the same batches, for
    each seed (default [tcfg.seed]), with data_seed = the seed unless `data_seed` fixes one for all.
    Returns {"per_seed": [...], "summary": {...}, ...}; deltas are DIFF minus vanilla (negative:
    DIFF is better)."""
    twin = _twin(cfg)
    seeds = [tcfg.seed] if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError("a paired run needs at least one seed")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _check_paired_out(out, resume)
    # packed documents are tokenised once, and validated before anything is written; every seed
    # repacks them in the order of its own data_seed (packing.for_run)
    data = packing.for_run(data, tcfg)
    data.check(tcfg.seq_len)
    folder_lock = None
    if out is not None and _writes(backend):
        folder_lock = runfolder.lock(out)  # a second paired run on this folder is refused while this one lives
        _check_paired_out(out, resume)  # again, under the lock
    try:
        return _run_seeds(cfg, twin, tcfg, data, backend, out, seeds, data_seed, budget_s, progress)
    finally:
        if folder_lock is not None:
            folder_lock.release()


def _run_seeds(cfg, twin, tcfg, data, backend, out, seeds, data_seed, budget_s, progress) -> dict:
    head = {"attention": cfg.attention, "backend": backend.name, "dtype": backend.dtype,
            "optimizer": tcfg.optimizer, "packing": tcfg.packing, "data": data.describe()["name"],
            "data_seed": "seed" if data_seed is None else data_seed,
            "model_config": harness.config_dict(cfg), "twin_config": harness.config_dict(twin),
            "train_config": harness.config_dict(tcfg)}
    per_seed = []
    for i, seed in enumerate(seeds):
        t = dataclasses.replace(tcfg, seed=seed, data_seed=seed if data_seed is None else data_seed)
        seed_data = packing.for_run(data, t)  # packed once for both arms, in this seed's data_seed order
        seed_dir = out / f"seed_{seed}" if out is not None else None
        shared_path = seed_dir / "shared.json" if seed_dir is not None else None
        if shared_path is not None and shared_path.is_file():
            shared = json.loads(shared_path.read_text())  # checked when this seed started
            for k in ("optimizer", "packing"):  # the recipe's axes: a seed resumes under its own
                theirs = shared.get(k, getattr(TrainConfig(), k))  # written before the axes: the default
                if theirs != getattr(t, k):
                    raise ConfigError(f"--out {out}: seed {seed} ran with --{k} {theirs}, this run --{k} "
                                      f"{getattr(t, k)}; resume with the same recipe or choose another folder")
        else:
            shared = check_shared_init(cfg, twin, t, backend)
            gc.collect()  # the two probe models, before training allocates
            if shared_path is not None and _writes(backend):
                seed_dir.mkdir(parents=True, exist_ok=True)
                runfolder.write_json(shared_path, shared)
        arms = {}
        for label, c in zip(ARMS, (cfg, twin)):
            if progress:
                print(f"seed {seed} ({i + 1}/{len(seeds)}): {label if label == 'vanilla' else cfg.attention}",
                      file=sys.stderr)
            arms[label] = _run_arm(label, c, t, seed_data, backend, seed_dir / label if seed_dir else None,
                                   budget_s, progress, shared["count"])
            gc.collect()  # the arm's model (and its CUDA graph, if any) is released before the next is built
        per_seed.append(_seed_result(seed, t, arms, shared))
        result = {**head, "seeds": seeds, "complete": len(per_seed) == len(seeds),
                  "position_bins": per_seed[0]["diff"]["position_bins"], "per_seed": per_seed,
                  "summary": summarize_seeds(per_seed)}
        if out is not None and _writes(backend):
            runfolder.write_json(out / "paired.json", {
                **result, "env": harness.environment(backend),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return result


def format_paired(r: dict) -> str:
    s = r["summary"]
    first = r["per_seed"][0]
    lines = [f"paired run: {r['attention']} vs vanilla twin, {first['diff']['steps']} {r.get('optimizer', 'adamw')} "
             f"steps on {r['data']} ({r.get('packing', 'random')} batches, {r['backend']}, {r['dtype']}), "
             f"seeds {','.join(map(str, s['seeds']))} (data seed: {r['data_seed']}); shared tensors "
             f"byte-identical at step 0 in every seed ({first['shared']['count']} tensors)",
             f"{'seed':>6s}{r['attention'] + ' loss':>14s}{'vanilla loss':>14s}{'delta nats':>12s}{'delta bpb':>12s}"]
    for p in r["per_seed"]:
        bpb = p["delta"]["val_bpb"]
        lines.append(f"{p['seed']:6d}{p['diff']['val_loss']:14.4f}{p['vanilla']['val_loss']:14.4f}"
                     f"{p['delta']['val_loss']:+12.4f}{'n/a' if bpb is None else format(bpb, '+.4f'):>12s}")
    lines.append(f"delta val loss (nats/token): {stats.interval_text(s['val_loss'])}")
    if s["val_bpb"] is not None:
        lines.append(f"delta val bpb: {stats.interval_text(s['val_bpb'])}")
    if s["accuracy"] is not None:
        lines.append(f"delta answer accuracy: {stats.interval_text(s['accuracy'])}")
    for (lo, hi), b in zip(r["position_bins"], s["loss_by_position"]):
        lines.append(f"  delta loss @ pos {lo}-{hi - 1}: {stats.interval_text(b)}")
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

