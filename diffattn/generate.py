"""Sampling and generation over the Backend protocol, in numpy.

Every backend hands its logits to numpy and the next token is drawn here, so two backends that
produce equal logits sample equal tokens from the same seed.

    sampler = Sampler(temperature=0.8, top_k=50, top_p=0.95, seed=0)
    tokens = generate(model, prompt (B, T) ints, max_new_tokens=64, sampler=sampler)

temperature 0 is greedy (argmax; the first of equal maxima). Otherwise logits / temperature,
then top-k (keep the k largest; ties at the k-th value are kept too), then top-p (keep the
smallest set of most probable tokens whose probability reaches p; the most probable token is
always kept), then one draw per row from numpy's PCG64 stream of `seed`, in batch-row order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 is greedy)")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1]")


def filtered_probs(logits: np.ndarray, cfg: SamplerConfig) -> np.ndarray:
    """(B, V) logits -> (B, V) float64 probabilities after temperature, top-k and top-p."""
    z = np.asarray(logits, np.float64) / cfg.temperature
    if not np.all(np.isfinite(z)):
        raise ValueError("logits hold NaN or Inf: nothing to sample from")
    if cfg.top_k is not None and cfg.top_k < z.shape[-1]:
        kth = -np.partition(-z, cfg.top_k - 1, axis=-1)[:, cfg.top_k - 1:cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p is not None and cfg.top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # probability of the tokens ranked above
        keep = np.zeros_like(p, bool)
        np.put_along_axis(keep, order, before < cfg.top_p, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


class Sampler:
    """Draws next tokens from (B, V) logits; one random stream per Sampler, seeded."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0):
        self.cfg = SamplerConfig(temperature, top_k, top_p, seed)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"logits must be (batch, vocab), got shape {logits.shape}")
        if self.cfg.temperature == 0:
            return np.argmax(logits, -1).astype(np.int64)
        p = filtered_probs(logits, self.cfg)
        u = self.rng.random(p.shape[0])
        cdf = np.cumsum(p, -1)
        return np.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(-1), p.shape[-1] - 1).astype(np.int64)


def generate(model, prompt, max_new_tokens: int, sampler: Sampler | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None, stop_token: int | None = None) -> np.ndarray:
    """Prefill the prompt (B, T) into the model's cache, then decode up to max_new_tokens, one
    token per row per step. Returns (B, n) new tokens; on_tokens sees each step's (B,) tokens as
    they come (streaming). With stop_token, stops once every row has produced it."""
    prompt = np.asarray(prompt)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, T>=1) tokens, got shape {prompt.shape}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens + {max_new_tokens} new exceeds the model's "
                         f"context of {model.cfg.max_seq_len} tokens")
    sampler = sampler or Sampler(temperature=0)
    out = np.zeros((prompt.shape[0], max_new_tokens), np.int64)
    if max_new_tokens == 0:
        return out
    logits = model.prefill(prompt, max_len=total)[:, -1]
    done = np.zeros(prompt.shape[0], bool)
    for i in range(max_new_tokens):
        tok = sampler(logits)
        out[:, i] = tok
        if on_tokens is not None:
            on_tokens(tok)
        if stop_token is not None:
            done |= tok == stop_token
            if done.all():
                return out[:, :i + 1]
        if i + 1 < max_new_tokens:
            logits = model.decode_step(tok)
    return out


# ---- trained models from run folders or checkpoints -----------------------------------------

def load_run(path, backend="numpy", device=None, dtype=None, kernels="auto"):
    """(model, tokenizer or None, manifest) of a run folder's latest checkpoint, or of a
    checkpoint folder, written by any backend, built on `backend` (a name or a loaded Backend).
    The tokenizer is the run's tokenizer.json, else the byte tokenizer when the run used bytes."""
    from pathlib import Path

    from diffattn import data as data_mod
    from diffattn.backend import load
    from diffattn.config import model_config_from
    from diffattn.harness import load_checkpoint

    params, _, manifest, ckpt = load_checkpoint(path)
    cfg = model_config_from(manifest["model_config"])
    be = load(backend, device=device, dtype=dtype, kernels=kernels) if isinstance(backend, str) else backend
    tok_file = Path(ckpt).parent.parent / "tokenizer.json"
    info = manifest.get("data", {})
    if tok_file.is_file():
        tok = data_mod.load_tokenizer(tok_file)
    elif info.get("tokenizer") in (None, "byte") and cfg.vocab_size <= 256:
        tok = data_mod.ByteTokenizer()  # byte-level text and the synthetic byte tasks
    else:
        tok = None
    return be.build(cfg, params), tok, manifest


def main(argv=None) -> int:
    """`diffattn generate RUN_OR_CKPT --prompt TEXT ...`: stream a continuation to stdout."""
    import argparse
    import codecs
    import sys

    ap = argparse.ArgumentParser(prog="diffattn generate",
                                 description="Continue a prompt with a trained model (any backend's checkpoint), "
                                             "streaming the text as it is decoded.")
    ap.add_argument("run", metavar="RUN_OR_CKPT", help="a run folder (its latest checkpoint) or a checkpoint folder")
    ap.add_argument("--prompt", required=True, help="the text to continue (encoded with the run's tokenizer)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="numpy", help="numpy | mlx | cuda (default numpy)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--tokens", action="store_true", help="print token ids, one line, instead of text")
    args = ap.parse_args(argv)
    from diffattn.cli import _bad_input_errors

    try:
        sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
        model, tok, _ = load_run(args.run, args.backend, args.device, args.dtype, args.kernels)
        if tok is None:
            raise ValueError(f"{args.run}: the run has no tokenizer.json to encode the prompt with")
        prompt = tok.encode(args.prompt)
        if len(prompt) == 0:
            raise ValueError("--prompt is empty: give at least one token of text")
        if prompt.max() >= model.cfg.vocab_size:
            raise ValueError(f"the prompt encodes to ids beyond the model's vocab_size {model.cfg.vocab_size}")
        n_new = min(args.max_new_tokens, model.cfg.max_seq_len - len(prompt))
        if n_new < 0 or args.max_new_tokens < 0:
            raise ValueError(f"the prompt's {len(prompt)} tokens leave no room in the model's context of "
                             f"{model.cfg.max_seq_len}" if n_new < 0 else "--max-new-tokens must be >= 0")
        if n_new < args.max_new_tokens:
            print(f"diffattn generate: {n_new} new tokens, what the model's context of {model.cfg.max_seq_len} "
                  f"leaves after the prompt's {len(prompt)}", file=sys.stderr)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = sys.stdout

        def show(tok_ids):
            if args.tokens:
                out.write(f"{int(tok_ids[0])} ")
            else:
                out.write(text.decode(tok.decode([int(tok_ids[0])])))
            out.flush()

        if not args.tokens:
            out.write(args.prompt)
        generate(model, prompt[None], n_new, sampler, on_tokens=show)
        out.write(text.decode(b"", final=True) + "\n" if not args.tokens else "\n")
        out.flush()
    except (*_bad_input_errors(), ValueError) as e:
        print(f"diffattn generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
