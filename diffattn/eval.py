"""Evaluation: held-out loss, bits per byte and loss by position, of a model in memory or of a
saved checkpoint on any backend.

    evaluate(model, data, tcfg)                   what the harness records at every eval
    evaluate_checkpoint(path, backend, data)      `diffattn eval RUN_OR_CKPT`

A checkpoint holds numpy parameters (safetensors) and its run's configs, so any backend
evaluates any backend's checkpoint. By default it is evaluated as its run evaluated it: the
run's context (seq_len), batch shape and eval batches, on the run's held-out split, so
`diffattn eval` of a run's last checkpoint reproduces the run's last recorded val loss (float32:
to ~1e-6; the same numbers in the same order on the same backend give the same result).

`--task lm` (language modelling) is the one task here. Other tasks come from diffattn.probes
where that module exists: it provides TASKS (names) and
`evaluate(task, model, cfg, seq_len=..., tokens=..., seed=...) -> dict`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from diffattn import spec
from diffattn.config import ConfigError, TrainConfig, model_config_from, train_config_from

POSITION_BINS = 8


def evaluate(model, data, tcfg: TrainConfig, n_bins: int = POSITION_BINS) -> dict:
    """Validation loss (nats/token), bits per byte (if the data has byte lengths), mean loss
    in `n_bins` equal bins of target position, and for retrieval tasks the answer accuracy.
    Reads tcfg.eval_batches batches of tcfg.batch_size x tcfg.seq_len."""
    L = tcfg.seq_len
    edges = np.linspace(0, L, min(n_bins, L) + 1).astype(int)
    nats, count, n_bytes = 0.0, 0, 0
    bin_sum, bin_count = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    correct = answers = 0
    answer_nats = 0.0
    for tokens, mask in data.val_batches(tcfg.batch_size, L, tcfg.eval_batches, tcfg.data_seed):
        tl = np.asarray(model.token_losses(tokens), np.float64)
        nats += float(tl.sum())
        count += tl.size
        if data.token_bytes is not None:
            n_bytes += int(data.token_bytes[tokens[:, 1:]].sum())
        per_pos = tl.sum(0)
        for i in range(len(edges) - 1):
            bin_sum[i] += per_pos[edges[i]:edges[i + 1]].sum()
            bin_count[i] += tl.shape[0] * (edges[i + 1] - edges[i])
        if mask is not None:
            pred = np.asarray(model.logits(tokens[:, :-1])).argmax(-1)
            correct += int((pred[mask] == tokens[:, 1:][mask]).sum())
            answers += int(mask.sum())
            answer_nats += float(tl[mask].sum())
    out = {"val_loss": nats / count,
           "val_bpb": spec.bits_per_byte(nats, n_bytes) if n_bytes else None,
           "position_bins": [[int(a), int(b)] for a, b in zip(edges[:-1], edges[1:])],
           "loss_by_position": (bin_sum / bin_count).tolist()}
    if answers:
        out["accuracy"] = correct / answers
        out["answer_loss"] = answer_nats / answers
    return out


def probe_tasks() -> tuple[str, ...]:
    """Tasks `diffattn eval --task` takes: "lm". The long-context probes (needle, mqar) score
    planted facts over a grid of lengths rather than a held-out loss, so they have their own
    command, `diffattn probe` (diffattn.probes)."""
    return ("lm",)


def evaluate_checkpoint(path, backend, data, *, tokens: float | None = None, seq_len: int | None = None,
                        batch_size: int | None = None, n_bins: int = POSITION_BINS, task: str = "lm") -> dict:
    """Load a checkpoint (a run folder, checkpoints/ or step_XXXXXX) into `backend` and evaluate
    it on `data`'s held-out split. Defaults are the run's own eval: its seq_len, batch size and
    eval batches; `tokens` sets the number of held-out tokens instead (rounded up to whole batches)."""
    from diffattn.runfolder import load_checkpoint

    if task not in probe_tasks():
        hint = " (long-context probes: diffattn probe RUN --task needle|mqar)"
        raise ConfigError(f"--task {task!r}: expected one of {probe_tasks()}{hint}")
    params, _, manifest, ckpt = load_checkpoint(path)
    cfg = model_config_from(manifest["model_config"])
    run = train_config_from(manifest["train_config"])
    L, B = seq_len or run.seq_len, batch_size or run.batch_size
    if L > cfg.max_seq_len:
        raise ConfigError(f"--seq-len {L} exceeds the model's context max_seq_len={cfg.max_seq_len}")
    if data.vocab_size > cfg.vocab_size:
        raise ConfigError(f"data {data.name!r} has token ids up to {data.vocab_size - 1}, beyond the model's "
                          f"vocab_size={cfg.vocab_size}")
    if not n_bins > 0:
        raise ConfigError(f"--position-bins {n_bins} must be positive")
    if tokens is not None and not tokens > 0:
        raise ConfigError(f"--tokens {tokens:g} must be positive")
    run_tokens = run.eval_batches * run.batch_size * run.seq_len
    n_batches = max(1, math.ceil((tokens or run_tokens) / (B * L)))
    data.check(L)
    t = dataclasses.replace(run, seq_len=L, batch_size=B, eval_batches=n_batches)
    model = backend.build(cfg, params, optim=run.optim)
    result = evaluate(model, data, t, n_bins)
    return {"task": task, "checkpoint": str(ckpt), "step": int(manifest["step"]), "attention": cfg.attention,
            "params": cfg.num_params(), "data": data.describe()["name"], "trained_on": manifest["data"]["name"],
            "seq_len": L, "batch_size": B, "eval_batches": n_batches, "tokens": n_batches * B * L,
            "backend": backend.describe(), "trained_with": manifest.get("env", {}).get("backend"), **result}
