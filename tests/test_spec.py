"""The numpy specification: against Microsoft's reference vectors, against finite differences,
and the invariants the paper's definitions imply."""
import math

import numpy as np
import pytest

from diffattn import conformance, spec
from diffattn.backend import NumpyBackend
from diffattn.config import ModelConfig
from diffattn.numerics import rel_error
from diffattn.params import attention_shapes, init_params

FIXTURE = "tests/fixtures/reference_diffattn.safetensors"
CASES = conformance.read_cases(FIXTURE)


rel = rel_error  # ||a - ref|| / ||ref||


# ---- Microsoft's reference vectors ----------------------------------------------------------

def test_fixture_covers_every_kind():
    assert {c.kind for c in CASES} == set(conformance.KINDS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_spec_reproduces_reference_modules(case):
    # the fixture is float32 output of Microsoft's modules: float32 rounding bounds agreement at ~1e-6
    rows = conformance.check_case(NumpyBackend("float64"), case)
    assert len(rows) == 2 + len(case.grads) + 1
    for tensor, err in rows:
        assert err <= 1e-5, (tensor, err)


# ---- the hand-written backward against central differences -----------------------------------

LAYOUTS = [
    ("vanilla", dict(d_model=32, n_heads=4, n_kv_heads=2)),   # GQA
    ("vanilla", dict(d_model=32, n_heads=4, n_kv_heads=1)),   # MQA
    ("diff", dict(d_model=32, n_heads=2)),                    # MHA
    ("diff", dict(d_model=32, n_heads=2, n_kv_heads=1)),      # MQA
    ("diff_v2", dict(d_model=32, n_heads=2)),
    ("diff_v2", dict(d_model=32, n_heads=2, n_kv_heads=1)),
]


def random_layer(cfg, seed):
    rng = np.random.default_rng(seed)
    p = {n: rng.standard_normal(s) * (0.3 if len(s) == 1 else 1 / math.sqrt(s[-1]))
         for n, s in attention_shapes(cfg).items()}
    if "subln.weight" in p:
        p["subln.weight"] += 1.0
    return p


def central_difference(f, a, h=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("attention,layout", LAYOUTS, ids=lambda v: str(v))
def test_attention_backward_matches_central_differences(attention, layout):
    cfg = ModelConfig(attention=attention, n_layers=3, max_seq_len=16, **layout)
    layer, B, L = 2, 2, 5  # L = 5: not a multiple of anything
    rng = np.random.default_rng(1)
    p = random_layer(cfg, 0)
    x = rng.standard_normal((B, L, cfg.d_model))
    gout = rng.standard_normal((B, L, cfg.d_model))
    _, dx, grads = spec.attention_vjp(cfg, layer, p, x, gout)

    def f():
        return float(np.sum(spec.attention(cfg, layer, p, x) * gout))

    # float64 central differences with h=1e-6 are accurate to ~1e-9 relative here
    assert rel(dx, central_difference(f, x)) <= 1e-6
    assert set(grads) == set(p)
    for name in p:
        assert rel(grads[name], central_difference(f, p[name])) <= 1e-6, name


@pytest.mark.parametrize("attention", ["vanilla", "diff", "diff_v2"])
def test_model_gradients_match_directional_differences(attention):
    cfg = ModelConfig(attention=attention, d_model=32, n_layers=2, n_heads=2, vocab_size=11,
                      max_seq_len=8, tie_embeddings=attention != "diff_v2")
    params = {k: v.astype(np.float64) for k, v in init_params(cfg, seed=3).items()}
    rng = np.random.default_rng(0)
    for k in params:  # move away from the symmetric init so every path carries gradient
        params[k] = params[k] + 0.05 * rng.standard_normal(params[k].shape)
    batch = rng.integers(0, cfg.vocab_size, (2, 7))
    _, grads = spec.model_loss_and_grads(cfg, params, batch)
    for trial in range(3):
        direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        h = 1e-5
        plus = {k: v + h * direction[k] for k, v in params.items()}
        minus = {k: v - h * direction[k] for k, v in params.items()}
        fd = (spec.token_losses(cfg, plus, batch).mean() - spec.token_losses(cfg, minus, batch).mean()) / (2 * h)
        analytic = sum(float(np.sum(grads[k] * direction[k])) for k in params)
        assert abs(analytic - fd) <= 1e-6 * abs(fd), (trial, analytic, fd)


# ---- invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attention,layout", LAYOUTS, ids=lambda v: str(v))
def test_attention_is_causal(attention, layout):
    cfg = ModelConfig(attention=attention, max_seq_len=16, **layout)
    p = random_layer(cfg, 0)
    x = np.random.default_rng(2).standard_normal((1, 9, cfg.d_model))
    base = spec.attention(cfg, 0, p, x)
    for t in range(9):
        y = x.copy()
        y[:, t] += 10.0
        changed = spec.attention(cfg, 0, p, y)
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert not np.allclose(changed[:, t:], base[:, t:])


def test_model_is_causal():
    cfg = ModelConfig(d_model=32, n_heads=2, vocab_size=17, max_seq_len=16)
    params = init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 17, (1, 10))
    base = spec.model_logits(cfg, params, tokens)
    edited = tokens.copy()
    edited[0, 6] = (edited[0, 6] + 1) % 17
    out = spec.model_logits(cfg, params, edited)
    np.testing.assert_array_equal(out[:, :6], base[:, :6])
    assert not np.allclose(out[:, 6:], base[:, 6:])


def test_diff_with_lambda_zero_is_plain_attention_then_subln():
    cfg = ModelConfig(attention="diff", d_model=32, n_heads=2, n_kv_heads=1, max_seq_len=16)
    layer, d = 1, cfg.head_dim
    li = cfg.lambda_init(layer)
    p = random_layer(cfg, 4)
    # lambda = exp(0) - exp(log(1 + li)) + li = 0
    p["lambda_q1"][:] = 0.0
    p["lambda_q2"][:] = p["lambda_k2"][:] = math.sqrt(math.log(1 + li) / d)
    assert abs(spec.diff_lambda(cfg, layer, p)[0]) < 1e-14
    x = np.random.default_rng(3).standard_normal((2, 7, cfg.d_model))
    # plain causal attention of each head's first map, over the (2d-wide) values, then subln
    B, L, _ = x.shape
    cos, sin = spec.rope_tables(L, d)
    q = spec.apply_rope((x @ p["q_proj.weight"].T).reshape(B, L, 2 * cfg.n_heads, d).transpose(0, 2, 1, 3), cos, sin)
    k = spec.apply_rope((x @ p["k_proj.weight"].T).reshape(B, L, 2, d).transpose(0, 2, 1, 3), cos, sin)
    v = (x @ p["v_proj.weight"].T).reshape(B, L, 1, 2 * d).transpose(0, 2, 1, 3)
    a, _ = spec.causal_attention(q[:, 0::2], np.repeat(k[:, :1], 2, 1), np.repeat(v, 2, 1), 1 / math.sqrt(d))
    y = spec.rmsnorm(a, p["subln.weight"], 1e-5) * (1 - li)
    expected = y.transpose(0, 2, 1, 3).reshape(B, L, -1) @ p["out_proj.weight"].T
    np.testing.assert_allclose(spec.attention(cfg, layer, p, x), expected, rtol=1e-12, atol=1e-12)


def test_lambda_init_follows_the_paper():
    cfg = ModelConfig()
    assert cfg.lambda_init(0) == pytest.approx(0.2)
    assert cfg.lambda_init(100) == pytest.approx(0.8, abs=1e-12)


def test_cross_entropy_and_bits_per_byte():
    logits = np.log(np.array([[[0.5, 0.25, 0.25]]]))
    nll, _ = spec.cross_entropy(logits, np.array([[1]]))
    assert nll[0, 0] == pytest.approx(math.log(4))
    # log(4) nats on one byte is exactly 2 bits per byte
    assert spec.bits_per_byte(float(nll.sum()), 1) == pytest.approx(2.0)


def test_float32_spec_tracks_float64():
    cfg = ModelConfig(attention="diff", d_model=32, n_heads=2, max_seq_len=16)
    p = random_layer(cfg, 0)
    x = np.random.default_rng(0).standard_normal((1, 6, 32))
    out64 = spec.attention(cfg, 0, p, x)
    out32 = spec.attention(cfg, 0, p, x, dtype=np.float32)
    assert out32.dtype == np.float32
    assert rel(out32, out64) <= 1e-5
