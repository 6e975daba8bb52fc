"""Statistics of paired results over seeds, numpy only (no scipy).

    summarize(deltas)             n, mean, sample std, standard error, 95% intervals
    t_quantile(p, df)             Student t quantile (inverse CDF)

Two 95% intervals of the mean seed delta:

- Student t: mean +- t(0.975, n-1) * s / sqrt(n), s the sample standard deviation (ddof 1). Exact
  if the per-seed deltas are normal; with few seeds it is wide (t(0.975, 1) = 12.7, t(0.975, 4) = 2.78).
- paired bootstrap, percentile method: the seeds are resampled with replacement (each seed's
  diff and vanilla arm stay together, so the pairing is kept), BOOTSTRAP_SAMPLES times from a
  fixed generator, and the interval is the 2.5% and 97.5% quantiles of the resampled means. No
  normality assumed, but with few seeds it is too narrow: it cannot reach beyond the extreme seeds.

The t distribution's CDF is 1 - I_x(df/2, 1/2) / 2 for t > 0, x = df / (df + t^2), with I the
regularized incomplete beta function (evaluated by its continued fraction); the quantile inverts
it by bisection.
"""
from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2)), by the
    modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta: x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df={df} must be positive")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), to ~1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} outside (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def bootstrap_means(values: np.ndarray, n_samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED):
    """Means of `n_samples` resamples (with replacement) of the rows of values (n, ...)."""
    values = np.asarray(values, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_samples, len(values)))
    return values[idx].mean(axis=1)


def summarize(values, level: float = LEVEL) -> dict:
    """Mean, sample std, standard error and the t and bootstrap intervals of `values` (one per
    seed). With one value the spread and intervals are None: one seed says nothing of seed noise."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("summarize: no values")
    out = {"n": int(v.size), "mean": float(v.mean()), "std": None, "sem": None, "level": level,
           "t_interval": None, "bootstrap_interval": None, "values": v.tolist()}
    if v.size >= 2:
        std = float(v.std(ddof=1))
        sem = std / math.sqrt(v.size)
        half = t_quantile(0.5 + level / 2, v.size - 1) * sem
        q = np.quantile(bootstrap_means(v), [0.5 - level / 2, 0.5 + level / 2])
        out.update(std=std, sem=sem, t_interval=[out["mean"] - half, out["mean"] + half],
                   bootstrap_interval=[float(q[0]), float(q[1])])
    return out


def summarize_columns(matrix, level: float = LEVEL) -> list[dict]:
    """summarize() of each column of matrix (n seeds, k), e.g. the delta in each position bin."""
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2:
        raise ValueError(f"summarize_columns: expected a (seeds, columns) matrix, got shape {m.shape}")
    return [summarize(m[:, j], level) for j in range(m.shape[1])]


def interval_text(s: dict, digits: int = 4) -> str:
    """'-0.0170 [t -0.0423, +0.0083] [bootstrap ...] (n=5, std 0.0203)' or the single value."""
    f = f"+.{digits}f"
    text = f"{s['mean']:{f}}"
    if s["t_interval"] is not None:
        (a, b), (c, d) = s["t_interval"], s["bootstrap_interval"]
        text += (f" {s['level']:.0%} t [{a:{f}}, {b:{f}}] bootstrap [{c:{f}}, {d:{f}}]"
                 f" (n={s['n']}, std {s['std']:.{digits}f})")
    else:
        text += f" (n={s['n']}: no interval)"
    return text
