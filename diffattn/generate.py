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
