"""DIFF's internals on a fixed probe batch, computed by the numpy spec from a model's parameters.

    rec = diagnose(cfg, params, probe_tokens, layers=strided_layers(cfg.n_layers, 3), lambda_mix=1.0)

Backend-neutral: the harness hands `model.state()`'s parameters to diffattn.spec, so every backend
logs the same figures for the same weights, and no backend computes anything extra. Per layer:

    lambda             DIFF V1's scalar lambda (learned; the map weight is lambda_mix * lambda)
    lambda_mean/_std   DIFF V2: token-wise lambda_t over the probe's tokens and heads
    entropy_pos        mean entropy (nats) of the positive map's rows (vanilla: its only map)
    entropy_neg        ... of the negative map's rows
    entropy_diff       ... of the difference map D = A1 - lambda_mix * lambda * A2, read as a
                       distribution over keys by |D| / sum |D| (D has negative entries)
    neg_norm           RMS of the negative map's contribution lambda_mix * lambda * A2 V
    neg_ratio          ||lambda_mix * lambda * A2 V|| / ||A1 V|| (how much of A1 V it cancels)

Means are over the probe's sequences, heads and query positions.
"""
from __future__ import annotations

import numpy as np

from diffattn import spec
from diffattn.config import ModelConfig

PROBE_SEQUENCES = 4
PROBE_MAX_LEN = 128


def strided_layers(n_layers: int, count: int) -> list[int]:
    """`count` layer indices spread evenly from the first to the last."""
    count = max(1, min(count, n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, count)})


def probe_batch(data, seq_len: int, data_seed: int) -> np.ndarray:
    """The fixed probe: the first validation batch's first sequences, as model inputs (B, L)."""
    tokens, _ = next(iter(data.val_batches(PROBE_SEQUENCES, seq_len, 1, data_seed)))
    return np.asarray(tokens)[:PROBE_SEQUENCES, :min(seq_len, PROBE_MAX_LEN)]


def row_entropy(p: np.ndarray) -> float:
    """Mean entropy (nats) of the last axis of nonnegative rows summing to 1."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return float(np.mean(-np.sum(p * logp, -1)))


def abs_row_entropy(d: np.ndarray) -> float:
    a = np.abs(d)
    s = a.sum(-1, keepdims=True)
    return row_entropy(np.where(s > 0, a / np.where(s > 0, s, 1.0), 0.0))


def _norm(t) -> float:
    return float(np.sqrt(np.sum(t * t)))


def layer_figures(cfg: ModelConfig, c: dict) -> dict:
    """The figures of one layer from its spec cache (spec.attention_caches)."""
    mix = c["mix"]
    if cfg.attention == "vanilla":
        return {"entropy_pos": row_entropy(c["p"])}
    if cfg.attention == "diff":
        lam = float(c["lam"])
        p1, p2, pos, neg = c["p1"], c["p2"], c["o1"], mix * lam * c["o2"]
        out = {"lambda": lam}
    else:
        lam = c["lam"]  # (B, H, L, 1)
        p1, p2 = c["p"][:, 0::2], c["p"][:, 1::2]
        pos, neg = c["a"][:, 0::2], mix * lam * c["a"][:, 1::2]
        out = {"lambda_mean": float(lam.mean()), "lambda_std": float(lam.std())}
    w = mix * lam
    out.update(entropy_pos=row_entropy(p1), entropy_neg=row_entropy(p2), entropy_diff=abs_row_entropy(p1 - w * p2),
               neg_norm=float(np.sqrt(np.mean(neg * neg))), neg_ratio=_norm(neg) / max(_norm(pos), 1e-300))
    return out


def diagnose(cfg: ModelConfig, params: dict, tokens: np.ndarray, layers: list[int], lambda_mix: float = 1.0) -> dict:
    """{"lambda_mix": mix, "layers": {"i": figures}} for the probe tokens (B, L)."""
    caches = spec.attention_caches(cfg, params, tokens, np.float64, lambda_mix)
    return {"lambda_mix": float(lambda_mix), "layers": {str(i): layer_figures(cfg, caches[i]) for i in layers}}


def scalars(rec: dict) -> dict[str, float]:
    """A diag record flattened to name -> value, for TensorBoard / wandb."""
    out = {"diag/lambda_mix": rec["lambda_mix"]}
    for layer, figs in rec["layers"].items():
        out.update({f"diag/layer{layer}/{k}": v for k, v in figs.items()})
    return out


SINKS = {"tensorboard": ("torch.utils.tensorboard", "torch and tensorboard: pip install tensorboard"),
         "wandb": ("wandb", "wandb: pip install wandb")}


def check_sinks(names) -> None:
    """One-line ConfigError for an unknown sink or one whose package is not installed."""
    import importlib

    from diffattn.config import ConfigError

    for name in names:
        if name not in SINKS:
            raise ConfigError(f"--diag-log {name!r}: expected one of {tuple(SINKS)}")
        try:
            importlib.import_module(SINKS[name][0])
            if name == "tensorboard":
                importlib.import_module("tensorboard")
        except ImportError:
            raise ConfigError(f"--diag-log {name} needs {SINKS[name][1]}") from None


class Sinks:
    """Optional TensorBoard and wandb (offline) writers of diag records; `names` a subset of
    ("tensorboard", "wandb"). A requested one that is not installed is a one-line error at start."""

    def __init__(self, names, out_dir):
        check_sinks(names)
        self.writers = []
        for name in names:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                w = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
                self.writers.append(lambda s, step, w=w: [w.add_scalar(k, v, step) for k, v in s.items()] and w.flush())
            else:
                import wandb

                run = wandb.init(mode="offline", dir=str(out_dir), project="diffattn")
                self.writers.append(lambda s, step, run=run: run.log(s, step=step))

    def write(self, rec: dict) -> None:
        for w in self.writers:
            w(scalars(rec), rec["step"])
