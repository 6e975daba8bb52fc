"""Statistics of paired deltas over seeds (diffattn.stats), against closed forms, published
t-table values and hand arithmetic."""
import itertools
import math

import numpy as np
import pytest

from diffattn import stats


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(p):
    # df 1 is the Cauchy distribution: tan(pi (p - 1/2)); df 2: (2p - 1) / sqrt(2 p (1 - p))
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-11)
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-11)
    assert stats.t_quantile(1 - p, 3) == -stats.t_quantile(p, 3)


@pytest.mark.parametrize("df,t975", [(3, 3.182446305), (4, 2.776445105), (7, 2.364624252), (10, 2.228138852),
                                     (30, 2.042272456), (100, 1.983971519)])
def test_t_quantile_matches_the_t_table(df, t975):
    # two-sided 95% critical values as printed (9 decimals) in standard t tables
    assert stats.t_quantile(0.975, df) == pytest.approx(t975, abs=2e-9)


def test_t_quantile_tends_to_the_normal_quantile():
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959963985, abs=1e-6)


def test_summary_of_five_seed_deltas_by_hand():
    # diff-mlx's five Stage 0 deltas as rounded in issue 26
    d = [-0.020, -0.022, -0.022, +0.017, -0.038]
    s = stats.summarize(d)
    # mean = -0.085 / 5 = -0.017; deviations -0.003, -0.005, -0.005, +0.034, -0.021;
    # squares sum to (9 + 25 + 25 + 1156 + 441)e-6 = 1656e-6; s^2 = 1656e-6 / 4 = 414e-6
    std = math.sqrt(414e-6)  # 0.0203470
    half = 2.776445105 * std / math.sqrt(5)  # t(0.975, 4) * s / sqrt(5) = 0.0252641
    assert s["n"] == 5 and s["mean"] == pytest.approx(-0.017, abs=1e-15)
    assert s["std"] == pytest.approx(std, rel=1e-12) and s["sem"] == pytest.approx(std / math.sqrt(5), rel=1e-12)
    assert s["t_interval"] == pytest.approx([-0.017 - half, -0.017 + half], abs=1e-10)
    assert s["t_interval"] == pytest.approx([-0.0422641, 0.0082641], abs=1e-7)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    # every one of the 5^5 equally likely resamples, enumerated: the distribution the Monte Carlo
    # bootstrap samples from
    d = np.array([-0.020, -0.022, -0.022, 0.017, -0.038])
    exact = np.array([d[list(i)].mean() for i in itertools.product(range(5), repeat=5)])
    lo, hi = np.quantile(exact, [0.025, 0.975])
    s = stats.summarize(d)
    # 10,000 draws: a tail quantile's estimate moves by ~ sqrt(.025 * .975 / 1e4) / density, here
    # ~2e-4 nats (normal approximation, the resampled means' sd 0.008); the bound allows 7x that
    assert s["bootstrap_interval"] == pytest.approx([lo, hi], abs=1.5e-3)
    assert s["bootstrap_interval"] == stats.summarize(d)["bootstrap_interval"]  # a fixed generator


def test_two_seeds_bootstrap_spans_them_and_t_uses_one_degree_of_freedom():
    # resamples of (a, b): a, (a + b) / 2, b with probability 1/4, 1/2, 1/4: 2.5% -> a, 97.5% -> b
    s = stats.summarize([0.01, 0.03])
    assert s["bootstrap_interval"] == pytest.approx([0.01, 0.03], abs=1e-15)
    half = 12.70620474 * (0.02 / math.sqrt(2)) / math.sqrt(2)  # std = |b - a| / sqrt(2), sem = std / sqrt(2)
    assert s["t_interval"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-9)


def test_one_seed_has_no_interval():
    s = stats.summarize([0.5])
    assert s["mean"] == 0.5 and s["std"] is None and s["t_interval"] is None and s["bootstrap_interval"] is None
    assert "no interval" in stats.interval_text(s)


def test_columns_are_summarized_one_by_one():
    m = [[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]]
    cols = stats.summarize_columns(m)
    assert [c["mean"] for c in cols] == [2.0, 1.0]
    assert cols[0]["std"] == pytest.approx(2.0) and cols[1]["std"] == 0.0
    assert cols[1]["t_interval"] == [1.0, 1.0] and cols[1]["bootstrap_interval"] == pytest.approx([1.0, 1.0])


def test_bad_input_is_an_error():
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)
