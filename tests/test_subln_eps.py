"""DIFF V1's subln takes its eps from the config (norm_eps) in the spec and in every backend, and
the asv kernel benchmark times V1 as the model runs it: with the subln."""
import importlib.util

import numpy as np
import pytest

from diffattn import spec
from diffattn.backend import load
from diffattn.config import ModelConfig
from diffattn.numerics import rel_error
from diffattn.params import init_params

BACKENDS = [b for b, mod in (("cuda", "torch"), ("mlx", "mlx")) if importlib.util.find_spec(mod)]


def case(norm_eps):
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, attention="diff", max_seq_len=16,
                      norm_eps=norm_eps)
    params = init_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    # small inputs: the rows the subln sees have mean(o^2) near eps, so eps moves the output
    x = 0.05 * rng.standard_normal((2, 16, cfg.d_model)).astype(np.float32)
    grad_out = rng.standard_normal((2, 16, cfg.d_model)).astype(np.float32)
    attn = {k[len("layers.0.attn."):]: v for k, v in params.items() if k.startswith("layers.0.attn.")}
    return cfg, attn, x, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
def test_subln_eps_is_the_configs_in_spec_and_backend(backend):
    """With norm_eps = 1e-2 the backend's attention layer (output and every gradient) matches the
    float64 spec at float32's 1e-5, and the spec's output with 1e-2 differs from 1e-5's by far
    more than that: a backend with a fixed eps would fail."""
    cfg, attn, x, grad_out = case(1e-2)
    ref = spec.attention_vjp(cfg, 0, attn, x.astype(np.float64), grad_out.astype(np.float64))
    other = spec.attention_vjp(case(1e-5)[0], 0, attn, x.astype(np.float64), grad_out.astype(np.float64))
    assert rel_error(other[0], ref[0]) > 1e-3  # eps matters at these inputs
    kw = {"device": "cpu", "kernels": "composed"} if backend == "cuda" else {}
    out, dx, grads = load(backend, dtype="float32", **kw).attention_vjp(cfg, 0, attn, x, grad_out)
    assert rel_error(out, ref[0]) <= 1e-5 and rel_error(dx, ref[1]) <= 1e-5
    for name, g in grads.items():
        bound = 1e-4 if "lambda" in name else 1e-5  # lambda's gradient is a nearly cancelling sum
        assert rel_error(g, ref[2][name]) <= bound, name


@pytest.mark.skipif(not importlib.util.find_spec("torch"), reason="needs torch")
def test_asv_times_diff_v1_with_its_subln():
    import torch

    from backends.cuda.ops import diff_v1_attention
    from backends.cuda.ops.norm import rms_norm
    from benchmarks import bench_kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, 4, 8, generator=g), torch.randn(1, 8, 4, 8, generator=g), torch.randn(1, 8, 2, 16, generator=g)
    lam, w = torch.tensor(0.4), torch.rand(16, generator=g) + 0.5
    op = bench_kernels._attention_op("torch", "composed", "diff", 1e-3)
    want = rms_norm(diff_v1_attention(q, k, v, lam, "composed"), w, 1e-3)
    assert torch.allclose(op(q, k, v, lam, w), want, rtol=1e-6, atol=1e-6)
