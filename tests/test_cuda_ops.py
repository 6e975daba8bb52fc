"""Attention cores of backends/cuda/ops against the float64 numpy oracles of
tests/attention_oracles.py (built from diffattn.spec).

Relative error ||a - ref|| / ||ref|| of the output and of every gradient. Tolerances: float64
1e-10, float32 1e-5 (accumulation over L * d terms in float32), bfloat16 2e-2 (8-bit mantissa
inputs and outputs). The Triton kernels run through the interpreter on CPU (TRITON_INTERPRET=1,
set here before triton is imported) at tiny shapes; GPU tests are marked `gpu`.
"""
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffattn.numerics import rel_error as rel  # noqa: E402
from attention_oracles import diff_v1_oracle, diff_v2_oracle, vanilla_oracle  # noqa: E402
from backends.cuda.ops import diff_v1_attention, diff_v2_attention, vanilla_attention  # noqa: E402
from backends.cuda.ops.paired.tuning import KernelOptions  # noqa: E402

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# ---- running an implementation -------------------------------------------------------------------

def inputs(variant, B, L, H, G, d, seed):
    """Float64 numpy inputs in the projection layout; lam for V1 a scalar, for V2 in (0, 1)."""
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s)  # noqa: E731
    if variant == "vanilla":
        return dict(q=n(B, L, H, d), k=n(B, L, G, d), v=n(B, L, G, d))
    if variant == "diff_v1":
        return dict(q=n(B, L, 2 * H, d), k=n(B, L, 2 * G, d), v=n(B, L, G, 2 * d), lam=np.array(rng.uniform(0.1, 0.9)))
    return dict(q=n(B, L, 2 * H, d), k=n(B, L, G, d), v=n(B, L, G, d), lam=rng.uniform(0.05, 0.95, (B, L, H)))


OPS = {"vanilla": (vanilla_attention, vanilla_oracle), "diff_v1": (diff_v1_attention, diff_v1_oracle),
       "diff_v2": (diff_v2_attention, diff_v2_oracle)}


def check(variant, impl, B, L, H, G, d, dtype, device="cpu", seed=0, strided=False, options=None):
    """Forward + backward of one implementation vs the oracle on the same (dtype-rounded) inputs,
    the fused kernels launched with options (KernelOptions, None: the defaults); returns {name: relative error}."""
    op, oracle = OPS[variant]
    x = inputs(variant, B, L, H, G, d, seed)
    ts = {}
    for name, a in x.items():
        lam_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # V1's lambda is a float32 parameter
        t = torch.tensor(a, dtype=lam_dtype if name == "lam" and a.ndim == 0 else dtype, device=device)
        if strided and a.ndim == 4:  # a non-contiguous view with the same values, as projections give
            t = torch.cat([t, t], dim=-1)[..., : a.shape[-1]]
        ts[name] = t.requires_grad_(True)
    do = torch.tensor(np.random.default_rng(seed + 1).standard_normal(out_shape(variant, x)), dtype=dtype, device=device)
    ref = oracle(**{n: t.detach().double().cpu().numpy() for n, t in ts.items()}, do=do.double().cpu().numpy())
    out = op(**ts, impl=impl, **({"options": options} if options is not None else {}))
    assert out.dtype == dtype and out.is_contiguous() and out.shape == ref["out"].shape
    out.backward(do)
    errs = {"out": rel(out.detach().double().cpu(), ref["out"])}
    for name, t in ts.items():
        errs["d" + name] = rel(t.grad.double().cpu(), ref[name])
    return errs


def out_shape(variant, x):
    q, v = x["q"], x["v"]
    if variant == "vanilla":
        return q.shape
    return (*q.shape[:2], q.shape[2] // 2, v.shape[3])


def assert_close(errs, dtype):
    tol = TOL[dtype]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"


# ---- CPU: naive and composed ----------------------------------------------------------------------

SHAPES = [  # B, L, H, G, d: MHA, GQA, MQA; L not a multiple of 16
    (2, 13, 2, 2, 8),
    (1, 21, 4, 2, 16),
    (2, 9, 2, 1, 8),
]


@pytest.mark.parametrize("variant", ["vanilla", "diff_v1", "diff_v2"])
@pytest.mark.parametrize("impl", ["naive", "composed"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_impls_match_oracle(variant, impl, shape, dtype):
    assert_close(check(variant, impl, *shape, dtype, strided=True), dtype)


def test_oracle_v1_lambda_gradient_is_finite_difference():
    """The oracle's d lambda agrees with a central difference of <dO, out>."""
    x = inputs("diff_v1", 1, 7, 2, 1, 4, seed=3)
    do = np.random.default_rng(4).standard_normal((1, 7, 2, 8))
    g = diff_v1_oracle(**x, do=do)["lam"]
    eps = 1e-6
    f = lambda lam: np.sum(do * diff_v1_oracle(**{**x, "lam": lam}, do=do)["out"])  # noqa: E731
    assert abs(g - (f(x["lam"] + eps) - f(x["lam"] - eps)) / (2 * eps)) <= 1e-6 * max(1.0, abs(g))


@pytest.mark.parametrize("impl", ["bogus", "flash"])
def test_unknown_impl_is_a_one_line_error(impl):
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="impl must be one of"):
        vanilla_attention(q, q, q, impl)


def test_bad_shapes_are_one_line_errors():
    q, k, v = torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 1, 12)  # v must be d or 2d wide
    with pytest.raises(ValueError, match="DIFF V1 attention wants"):
        diff_v1_attention(q, k, v, torch.tensor(0.5), "naive")
    with pytest.raises(ValueError, match="DIFF V2 lambda must have shape"):
        diff_v2_attention(q, k[:, :, :1], k[:, :, :1], torch.zeros(1, 4, 3), "composed")


# ---- the fused Triton kernels -------------------------------------------------------------------

FUSED_CPU_SHAPES = [  # tiny, for the interpreter; block size there is 16
    (2, 37, 2, 2, 16),  # MHA, L not a multiple of the block, three blocks
    (1, 40, 4, 2, 16),  # GQA: two output heads per kv head
    (1, 33, 2, 1, 32),  # MQA, head_dim 32
    (1, 19, 2, 1, 8),   # head_dim 8 (the reference fixture's GQA case): zero-padded to the 16-wide kernel
    (1, 21, 2, 2, 24),  # head_dim 24: not a kernel width, padded to 32
]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
@pytest.mark.parametrize("shape", FUSED_CPU_SHAPES)
def test_fused_interpreted_float32(variant, shape):
    assert_close(check(variant, "fused", *shape, torch.float32, strided=True), torch.float32)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_paired_forward_saves_what_the_naive_contract_says(variant):
    """The forward kernel's three outputs (out, map 2's o2, both maps' base-2 log-sum-exp) are the
    materialized contract of paired/naive.py at float32's tolerance; the backward reads o2 and lse."""
    from backends.cuda.ops.paired import launch, naive
    x = {n: torch.tensor(a, dtype=torch.float32) for n, a in inputs(variant, 2, 37, 4, 2, 16, 4).items()}
    B, L, H = x["q"].shape[0], x["q"].shape[1], x["q"].shape[2] // 2
    lam_rows = x["lam"].expand(B, L, H) if variant == "diff_v1" else x["lam"]
    k_step, shared_k = (2, False) if variant == "diff_v1" else (1, True)
    got = launch.forward(x["q"], x["k"], x["v"], lam_rows, k_step, shared_k)
    want = naive.attention(x["q"], x["k"], x["v"], lam_rows, k_step, shared_k)
    for name, a, b in zip(("out", "o2", "lse"), got, want):
        assert a.shape == b.shape and rel(a, b) <= 1e-5, name


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
def test_kernel_options_get_their_own_ops_and_leave_the_defaults_alone():
    """Options are passed in, never set globally: a call with other options launches ops of its own
    (named by the options' tag) with the same result, and the defaults' ops are untouched."""
    x = {n: torch.tensor(a, dtype=torch.float32) for n, a in inputs("diff_v2", 1, 19, 2, 1, 16, 6).items()}
    other = KernelOptions(tma=False, dkdv_pairs_together=2)
    assert other.tag and other.tag == KernelOptions(tma=False, dkdv_pairs_together=2).tag
    a = diff_v2_attention(**x, impl="fused")
    b = diff_v2_attention(**x, impl="fused", options=other)
    assert torch.equal(a, b)
    assert hasattr(torch.ops.diffattn, f"diff_v2_{other.tag}_fwd") and hasattr(torch.ops.diffattn, "diff_v2_fwd")
    with pytest.raises(TypeError, match="must be a KernelOptions"):
        diff_v2_attention(**x, impl="fused", options={"tma": False})


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
def test_fused_forward_in_column_slices(monkeypatch):
    """The forward split over V's columns (used for V1 at d 128 on the GPU) gives the same result."""
    options = KernelOptions(fwd_slices=(((16, 32, 4), 2),))
    assert_close(check("diff_v1", "fused", 1, 37, 2, 1, 16, torch.float32, options=options), torch.float32)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("diagonal", ["first", "unrolled", "last"])
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_dkdv_diagonal_placements(variant, diagonal):
    """Each place the dK/dV kernel can walk its masked diagonal query blocks gives the oracle's
    gradients; a 32-key block over 16-query blocks makes the diagonal two steps, as on the GPU."""
    options = KernelOptions(diagonal=diagonal).with_tiles({("dkdv", d, dv, 4): (16, 32, 4, 1) for d, dv in ((16, 32), (16, 16))})
    assert_close(check(variant, "fused", 1, 40, 4, 2, 16, torch.float32, strided=True, options=options), torch.float32)


if HAVE_TRITON:
    import triton.language as tl

    from backends.cuda.ops.paired.bwd import dkdv_launch_order

    @triton.jit
    def launch_order_probe(OUT, PAIRS_TOGETHER: tl.constexpr):
        """Writes what the j-th dK/dV program in launch order computes, (key block, pair), at OUT[j]."""
        job = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        n, pair = dkdv_launch_order(PAIRS_TOGETHER)
        tl.store(OUT + 2 * job, n)
        tl.store(OUT + 2 * job + 1, pair)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("together", [1, 2, 3, 8])
def test_dkdv_launch_order_covers_every_block_once_heaviest_first(together):
    """The j-th dK/dV program in launch order computes one (key block, batch x kv head pair); over
    the grid each one once. Pairs run in groups of `together` (the last one short when they do not divide):
    within a group every pair's key block n launches before any pair's block n + 1."""
    n_blocks, n_pairs = 4, 5
    got = torch.full((n_blocks * n_pairs, 2), -1, dtype=torch.int32)
    launch_order_probe[(n_blocks, n_pairs)](got, PAIRS_TOGETHER=together)
    order = [tuple(r) for r in got.tolist()]
    assert sorted(order) == [(n, p) for n in range(n_blocks) for p in range(n_pairs)]
    groups = [list(range(p, min(p + together, n_pairs))) for p in range(0, n_pairs, together)]
    want = [(n, p) for pairs in groups for n in range(n_blocks) for p in pairs]
    assert order == want


@needs_triton
def test_dkdv_runs_together_the_most_pairs_that_divide_evenly_and_fit_half_the_l2():
    from backends.cuda.ops.paired import tuning
    mib = 2 ** 20
    assert tuning.PAIRS_TOGETHER_MIN == 8
    assert tuning.pairs_together(64, 1 * mib, 60 * mib) == 16  # the training step's shape: 30 fit
    assert tuning.pairs_together(64, 3 * mib, 60 * mib) == 8  # 10 fit, 8 divides 64
    assert tuning.pairs_together(16, 4 * mib, 60 * mib) == 1  # 7 fit: fewer than 8
    assert tuning.pairs_together(13, 1 * mib, 60 * mib) == 13  # all of them: no more than there are
    assert tuning.pairs_together(4, 1 * mib, 60 * mib) == 4  # all of them, though fewer than 8
    assert tuning.pairs_together(13, 3 * mib, 60 * mib) == 1  # 10 fit, 13 is prime
    assert tuning.pairs_together(8, 1 * mib, 0) == 1  # no L2 figure (CPU)
    fixed = tuning.parse_options("dkdv_pairs_together=4")  # as kernels_sweep gives it
    assert tuning.pairs_together(64, 1 * mib, 50 * mib, fixed) == 4


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_dkdv_launch_order_gives_the_oracles_gradients(variant):
    """Groups of 3 (batch, kv head) pairs over 4 pairs and 3 key blocks of 16: the gradients are the
    oracle's whichever program computes which block."""
    options = KernelOptions(dkdv_pairs_together=3)
    assert_close(check(variant, "fused", 2, 40, 4, 2, 16, torch.float32, strided=True, options=options), torch.float32)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_fused_reads_any_strides(monkeypatch, variant):
    """Views as the model passes them (v a column slice of the fused projection, row stride 3x its
    width) and views whose last stride is not 1 give the contiguous inputs' output and gradients.
    The dK/dV kernel stores through its loads' offsets (GRADS_LIKE_INPUTS, faster: docs/kernels.md
    v8) exactly when the gradients, written contiguous, share the inputs' strides: for contiguous
    inputs and for the copies the launcher makes of views whose last stride is not 1."""
    from torch.library import wrap_triton

    from backends.cuda.ops.paired import bwd, launch
    op = OPS[variant][0]
    x = {n: torch.tensor(a, dtype=torch.float32) for n, a in inputs(variant, 1, 37, 2, 2, 16, 0).items()}
    do = torch.randn(out_shape(variant, x), generator=torch.Generator().manual_seed(1))
    grads_like_inputs = []

    def recording(kernel):  # wrap_triton, noting the dK/dV launch's choice
        launcher = wrap_triton(kernel)

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if kernel is bwd.paired_attention_bwd_dkdv:
                        grads_like_inputs.append(kwargs["GRADS_LIKE_INPUTS"])
                    return launcher[grid](*args, **kwargs)
                return launch
        return Grid()
    monkeypatch.setattr(launch, "wrap_triton", recording)

    def run(views):
        ts = {n: t.clone().requires_grad_(True) for n, t in x.items()}
        out = op(*(views(ts[n]) if ts[n].ndim == 4 else ts[n] for n in ("q", "k", "v", "lam")), impl="fused")
        out.backward(do)
        return [out] + [ts[n].grad for n in ("q", "k", "v", "lam")]

    def slice_of_wider(t):  # t's values in columns of a 3x wider tensor, as a fused projection gives
        return torch.cat([t, 2 * t, 3 * t], dim=-1)[..., : t.shape[-1]]

    def last_stride_2(t):
        return torch.stack([t, -t], dim=-1)[..., 0]

    expected = run(lambda t: t)
    for views in (slice_of_wider, last_stride_2):
        for got, want in zip(run(views), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads_like_inputs == [True, False, True]


def subln_oracle(o, weight, eps):
    """DIFF V1's subln written out: o / sqrt(mean(o^2) + eps) * weight over the last dim."""
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight


def subln_errors(shape, dtype, device):
    """DIFF V1 with its subln fused (forward epilogue, backward in the deltas' pass) in dtype against
    the float64 naive attention followed by the norm written out: relative error of the output and
    of every gradient, the norm's weight included."""
    B, L, H, G, d = shape
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in
         ((B, L, 2 * H, d), (B, L, 2 * G, d), (B, L, G, 2 * d))]
    x += [torch.tensor(0.6, dtype=torch.float64), torch.rand(2 * d, generator=gen, dtype=torch.float64) + 0.5]
    dy = torch.randn(B, L, H, 2 * d, generator=gen, dtype=torch.float64)
    results = {}
    for impl, dt, dev in (("naive", torch.float64, "cpu"), ("fused", dtype, device)):
        # lambda and the norm's weight stay float32, as the model holds them
        ts = [t.detach().to(dev, dt if t.ndim == 4 or dt == torch.float64 else torch.float32).requires_grad_(True)
              for t in x]
        q, k, v, lam, weight = ts
        if impl == "naive":
            y = subln_oracle(diff_v1_attention(q, k, v, lam, impl="naive"), weight, 1e-5)
        else:
            y = diff_v1_attention(q, k, v, lam, impl="fused", norm=(weight, 1e-5))
        y.backward(dy.to(dev, y.dtype))
        results[impl] = [y] + [t.grad for t in ts]
    names = ["y", "dq", "dk", "dv", "dlam", "dweight"]
    return {n: rel(a.detach().cpu().double(), b.detach().numpy()) for n, a, b in
            zip(names, results["fused"], results["naive"])}


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 16), (1, 40, 4, 2, 16), (1, 33, 2, 1, 32)])
def test_fused_subln_interpreted(shape):
    assert_close(subln_errors(shape, torch.float32, "cpu"), torch.float32)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
def test_fused_subln_with_column_slices_interpreted():
    """16-bit V1 at head dim 128 splits the forward into column slices (FWD_SLICES): no program holds
    a whole row, so the launcher normalizes after the kernel; the backward keeps the fused norm pass."""
    assert_close(subln_errors((1, 20, 1, 1, 128), torch.float16, "cpu"), torch.float16)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 300, 4, 2, 64), (1, 300, 2, 1, 128)])
def test_fused_subln_gpu(dtype, shape):
    """The same on the GPU at the training shape's head dim (64, v 128), and at 128 (v 256), where
    bf16's forward runs in column slices and so normalizes after the kernel: bf16 within 2e-2."""
    assert_close(subln_errors(shape, dtype, "cuda"), dtype)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
def test_subln_of_a_padded_head_dim_runs_outside_the_kernels():
    """At a head dim the kernels pad (24 -> 32) the zero columns must not enter the norm's mean: the
    op normalizes the sliced output instead, exactly rms_norm of the unnormed op's output."""
    from backends.cuda.ops.norm import rms_norm
    q, k, v = torch.randn(1, 21, 4, 24), torch.randn(1, 21, 2, 24), torch.randn(1, 21, 1, 48)
    lam, weight = torch.tensor(0.6), torch.rand(48) + 0.5
    normed = diff_v1_attention(q, k, v, lam, impl="fused", norm=(weight, 1e-5))
    assert torch.equal(normed, rms_norm(diff_v1_attention(q, k, v, lam, impl="fused"), weight, 1e-5))


@needs_triton
def test_tma_needs_16_byte_aligned_strides():
    """Inputs a tensor descriptor cannot address take the pointer loads (the same kernels)."""
    from backends.cuda.ops.triton_runtime import tma_aligned
    qkv = torch.zeros(2, 37, 3 * 4 * 64, dtype=torch.bfloat16)
    assert tma_aligned(qkv.view(2, 37, 12, 64)[:, :, 4:8])          # k of a fused q/k/v projection
    odd_rows = torch.zeros(2, 37, 4 * 64 + 5, dtype=torch.bfloat16)  # e.g. a projection with 5 extra columns
    assert not tma_aligned(odd_rows[..., :256].unflatten(-1, (4, 64)))  # row stride 261 elements
    assert not tma_aligned(qkv.view(-1)[1:65].view(1, 1, 1, 64))      # base 2 bytes off
    assert not tma_aligned(qkv.view(2, 37, 12, 64).transpose(-1, -2))  # last stride not 1


@needs_triton
def test_gluon_dkdv_applies_to_what_it_was_written_for(monkeypatch, caplog):
    """V2's warp-specialized Gluon dK/dV kernel takes sm_90, bf16, head_dim 64, heads side by side
    in TMA-addressable rows, on the Triton release it was checked on; everything else, V1
    included, keeps the Triton kernel."""
    from backends.cuda.ops import triton_runtime
    from backends.cuda.ops.paired import launch
    monkeypatch.setattr(launch, "INTERPRETED", False)  # the interpreter never takes it
    monkeypatch.setattr(triton_runtime.triton, "__version__", triton_runtime.GLUON_TRITON + "0")
    bf = torch.bfloat16
    qkv = torch.zeros(2, 37, (4 + 2 + 2) * 64, dtype=bf).view(2, 37, 8, 64)  # a fused V2 projection's heads
    q, k, v, do = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:], torch.zeros(2, 37, 2, 64, dtype=bf)

    def applies(q, k, v, do, shared_k=True, capability=(9, 0), options=KernelOptions()):
        return launch.dkdv_ws_applies(q, k, v, do, shared_k, capability, options)

    assert applies(q, k, v, do)
    assert not applies(q, k, v, do, capability=(8, 0)) and not applies(q, k, v, do, capability=(10, 0))
    assert not applies(*(t.half() for t in (q, k, v, do)))
    assert not applies(torch.cat([q, q], -1)[..., :64], k, v, do)  # heads 128 columns apart
    assert not applies(q[..., :32], k[..., :32], v[..., :32], do[..., :32])  # head_dim 32
    odd_rows = torch.zeros(2, 37, 4 * 64 + 5, dtype=bf)[..., :256].unflatten(-1, (4, 64))
    assert not applies(odd_rows, k, v, do)  # a row stride TMA cannot take
    wide = torch.zeros(2, 37, 2, 128, dtype=bf)
    assert not applies(torch.zeros(2, 37, 4, 64, dtype=bf), torch.zeros(2, 37, 4, 64, dtype=bf), wide, wide,
                       shared_k=False)  # V1
    monkeypatch.setattr(triton_runtime.triton, "__version__", "3.9.0")  # Gluon's API differs there
    with caplog.at_level("WARNING", logger="diffattn.kernels"):
        assert not applies(q, k, v, do)
    assert "Triton 3.9.0" in caplog.text and "run instead" in caplog.text  # a stated fallback, not a silent one
    monkeypatch.setattr(triton_runtime.triton, "__version__", triton_runtime.GLUON_TRITON + "0")
    assert not applies(q, k, v, do, options=KernelOptions(dkdv_ws=False))


@needs_triton
def test_gluon_dq_applies_to_what_it_was_written_for(monkeypatch):
    """The warp-specialized Gluon dQ kernel takes V1 (V 128 wide) and V2 (V 64 wide, from
    dq_ws_v2_min_len keys on) at head_dim 64 on sm_90, bf16, heads side by side in TMA-addressable
    rows, on the Triton release it was checked on; everything else keeps the Triton dQ kernel."""
    from backends.cuda.ops import triton_runtime
    from backends.cuda.ops.paired import launch
    monkeypatch.setattr(launch, "INTERPRETED", False)
    monkeypatch.setattr(triton_runtime.triton, "__version__", triton_runtime.GLUON_TRITON + "0")
    bf = torch.bfloat16
    z = lambda *shape: torch.zeros(*shape, dtype=bf)  # noqa: E731
    v1 = z(2, 37, 4, 64), z(2, 37, 4, 64), z(2, 37, 2, 128), z(2, 37, 2, 128)
    v2 = z(2, 37, 4, 64), z(2, 37, 1, 64), z(2, 37, 1, 64), z(2, 37, 2, 64)

    def applies(q, k, v, do, capability=(9, 0), options=KernelOptions(dq_ws_v2_min_len=37)):
        return launch.dq_ws_applies(q, k, v, do, capability, options)

    short = KernelOptions(dq_ws_v2_min_len=38)
    assert applies(*v1, options=short) and not applies(*v2, options=short)  # V2 shorter than the minimum; V1 at any length
    assert applies(*v1) and applies(*v2)
    assert not applies(*v1, capability=(8, 0)) and not applies(*v2, capability=(10, 0))
    assert not applies(*(t.half() for t in v1))
    assert not applies(z(2, 37, 4, 128), z(2, 37, 4, 128), z(2, 37, 2, 256), z(2, 37, 2, 256))  # V1 at d 128
    assert not applies(v1[0], v1[1], z(2, 37, 2, 256)[..., :128], v1[3])  # V's heads 256 columns apart
    odd_rows = z(2, 37, 4 * 64 + 5)[..., :256].unflatten(-1, (4, 64))
    assert not applies(odd_rows, *v1[1:])
    monkeypatch.setattr(triton_runtime.triton, "__version__", "3.9.0")
    assert not applies(*v1)
    monkeypatch.setattr(triton_runtime.triton, "__version__", triton_runtime.GLUON_TRITON + "0")
    off = KernelOptions(dq_ws=False, dq_ws_v2_min_len=37)
    assert not applies(*v1, options=off) and not applies(*v2, options=off)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_fused_tma_loads_interpreted(monkeypatch, variant):
    """The tensor-descriptor (TMA) K/V loads that sm_90 GPUs take give the oracle's result too: rows
    past L come from the descriptor's zero fill instead of masked loads."""
    import triton
    from backends.cuda.ops.paired import launch
    calls = []

    def use_tma(options, *ts):  # what _use_tma does on a GPU, with CPU scratch for the descriptors
        calls.append(len(ts))
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
        return True

    monkeypatch.setattr(launch, "_use_tma", use_tma)
    assert_close(check(variant, "fused", 2, 37, 2, 2, 16, torch.float32, strided=True), torch.float32)
    assert len(calls) == 2  # the forward and the dQ kernel took the descriptor path


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_fused_interpreted_float16(variant):
    # bfloat16 is not tested here: Triton 3.6's interpreter computes bf16 dots wrongly; the GPU tests cover it
    assert_close(check(variant, "fused", 1, 37, 2, 1, 16, torch.float16), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["vanilla", "diff_v1", "diff_v2"])
def test_composed_traces_whole_under_dynamic_shapes(variant):
    """With every dim symbolic (as torch.compile makes them after a shape change) the composed path
    is one graph (fullgraph: a graph break is an error) with eager's output: grouped heads (GQA)
    are decided from the heads' static count, not a symbolic comparison SDPA would refuse."""
    op = OPS[variant][0]
    x = {n: torch.tensor(a, dtype=torch.float32) for n, a in inputs(variant, 2, 19, 4, 2, 16, 3).items()}
    call = lambda **t: op(**t, impl="composed")  # noqa: E731
    compiled = torch.compile(call, backend="eager", dynamic=True, fullgraph=True)
    assert rel(compiled(**x).double(), call(**x).double().numpy()) <= 1e-6


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_fused_traces_under_torch_compile(variant):
    """The custom ops' fake kernels and autograd let torch.compile trace a whole graph (aot_eager:
    no code generation) that gives the eager result."""
    op = OPS[variant][0]
    x = {n: torch.tensor(a, dtype=torch.float32, requires_grad=True) for n, a in inputs(variant, 1, 19, 2, 1, 16, 5).items()}

    def loss(q, k, v, lam):
        return (op(q, k, v, lam, "fused") ** 2).sum()

    eager = torch.autograd.grad(loss(**x), list(x.values()))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    traced = torch.autograd.grad(compiled(**x), list(x.values()))
    for a, b in zip(traced, eager):
        assert rel(a.double(), b.double().numpy()) <= 1e-6


@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(torch.cuda.is_available() or not INTERPRETED, reason="interpreter run is for CPU-only machines")
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_fused_custom_ops_pass_opcheck(variant):
    """torch.library.opcheck: schema, autograd registration, fake kernels (shapes and strides the
    real kernels give) and AOT dispatch, for the forward and the backward op."""
    x = {n: torch.tensor(a, dtype=torch.float32, requires_grad=True) for n, a in inputs(variant, 1, 19, 2, 1, 16, 7).items()}
    OPS[variant][0](**x, impl="fused")  # imports the module that registers the ops
    fwd, bwd = getattr(torch.ops.diffattn, variant + "_fwd").default, getattr(torch.ops.diffattn, variant + "_bwd").default
    torch.library.opcheck(fwd, tuple(x.values()))
    saved = [t.detach() for t in fwd(*x.values())]
    do = torch.randn(saved[0].shape)
    torch.library.opcheck(bwd, (do, *(t.detach() for t in x.values()), *saved))
    if variant == "diff_v1":  # and the pair with the fused subln
        fwd, bwd = torch.ops.diffattn.diff_v1_normed_fwd.default, torch.ops.diffattn.diff_v1_normed_bwd.default
        weight = torch.rand(x["v"].shape[-1]) + 0.5
        torch.library.opcheck(fwd, (*x.values(), weight.requires_grad_(True), 1e-5))
        y, *saved = [t.detach() for t in fwd(*x.values(), weight, 1e-5)]
        torch.library.opcheck(bwd, (torch.randn(y.shape), *(t.detach() for t in x.values()), weight.detach(), 1e-5,
                                    *saved))


@needs_triton
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs a GPU or the interpreter")
def test_fused_bad_inputs_are_one_line_errors():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kv, lam = torch.zeros(1, 4, 4, 160, device=dev), torch.zeros(1, 4, 1, 160, device=dev), torch.zeros(1, 4, 2, device=dev)
    with pytest.raises(ValueError, match="even head_dim up to 128"):
        diff_v2_attention(q, kv, kv, lam, "fused")
    q, kv = torch.zeros(1, 4, 4, 16, device=dev), torch.zeros(1, 4, 1, 16, device=dev)
    with pytest.raises(ValueError, match="of one dtype"):
        diff_v2_attention(q, kv.double(), kv, lam, "fused")
    with pytest.raises(ValueError, match="of one dtype"):
        diff_v2_attention(q.double(), kv.double(), kv.double(), lam, "fused")


def test_fused_on_cpu_without_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        diff_v2_attention(q, q[:, :, :2], q[:, :, :2], torch.zeros(1, 4, 2), "fused")


GPU_CASES = [  # B, L, H, G, d: L never a multiple of the block sizes
    (2, 1000, 4, 2, 32),
    (2, 1000, 4, 4, 64),
    (1, 777, 4, 1, 128),
]


def gluon_ops(variant, x, options):
    """The opaque ops (Gluon kernels) the fused backward of these inputs takes under these options."""
    from backends.cuda.ops.paired import launch
    q, k, v = x["q"], x["k"], x["v"]
    do = v.new_empty(*q.shape[:2], q.shape[2] // 2, v.shape[-1])
    capability = torch.cuda.get_device_capability()
    return ({"paired_dkdv_ws"} if launch.dkdv_ws_applies(q, k, v, do, variant == "diff_v2", capability, options)
            else set()) | ({"paired_dq_ws"} if launch.dq_ws_applies(q, k, v, do, capability, options) else set())


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
@pytest.mark.parametrize("shape, dtype", [(s, t) for s in GPU_CASES for t in (torch.float32, torch.bfloat16)]
                         + [(GPU_CASES[1], torch.float16)])  # float16 takes bfloat16's path; one shape
def test_fused_gpu(variant, shape, dtype):
    """Float32 runs every dot in IEEE precision (never tf32), so it must meet 1e-5."""
    assert_close(check(variant, "fused", *shape, dtype, device="cuda", strided=True), dtype)


def _gluon_runs_here():
    if not (HAVE_TRITON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        return False
    import triton
    from backends.cuda.ops import triton_runtime
    return triton.__version__.startswith(triton_runtime.GLUON_TRITON)


needs_sm90 = pytest.mark.skipif(not _gluon_runs_here(), reason="the Gluon kernels run on sm_90 with the Triton "
                                "release they were checked on")


@gpu
@needs_sm90
@needs_triton
@pytest.mark.parametrize("shape", [(2, 1000, 4, 2, 64), (3, 300, 4, 4, 64), (1, 129, 2, 1, 64), (1, 64, 2, 2, 64)])
def test_fused_gpu_with_gluon_dkdv(monkeypatch, shape):
    """bf16 V2 inputs laid out as the model's projections give them (heads side by side) take the
    warp-specialized Gluon dK/dV kernel; with it the whole fused op meets the oracle at bf16's
    tolerance. The spy makes sure the Gluon kernel ran, not the Triton one."""
    from backends.cuda.ops.paired import bwd_ws
    calls = []
    launch = bwd_ws.dkdv
    monkeypatch.setattr(bwd_ws, "dkdv", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    errs = check("diff_v2", "fused", *shape, torch.bfloat16, device="cuda", options=KernelOptions(dkdv_ws=True))
    assert calls, "the Gluon dK/dV kernel did not run"
    assert_close(errs, torch.bfloat16)


@gpu
@needs_sm90
@needs_triton
def test_gluon_dkdv_equals_triton_dkdv():
    """The two dK/dV kernels take the same products in the same order (per key block: its diagonal
    query block first, then the rest, each MMA summing the head dim the same way), so their
    gradients are bitwise equal; the oracle test alone could not see a difference under bf16's 2e-2."""
    x = {n: torch.tensor(a, dtype=torch.bfloat16, device="cuda", requires_grad=True)
         for n, a in inputs("diff_v2", 2, 777, 4, 2, 64, 11).items()}
    do = torch.randn(2, 777, 4, 64, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for ws in (True, False):
        out = diff_v2_attention(**x, impl="fused", options=KernelOptions(dkdv_ws=ws))
        grads[ws] = torch.autograd.grad(out, (x["k"], x["v"]), do)
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


@gpu
@needs_sm90
@needs_triton
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
@pytest.mark.parametrize("shape", [(2, 1000, 4, 2, 64), (3, 300, 4, 4, 64), (1, 129, 2, 1, 64), (1, 64, 2, 2, 64)])
def test_fused_gpu_with_gluon_dq(monkeypatch, variant, shape):
    """bf16 inputs with heads side by side take the warp-specialized Gluon dQ kernel (V1 and V2);
    with it the whole fused op meets the oracle at bf16's tolerance. The spy makes sure it ran."""
    from backends.cuda.ops.paired import bwd_ws
    calls = []
    launch = bwd_ws.dq
    monkeypatch.setattr(bwd_ws, "dq", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    errs = check(variant, "fused", *shape, torch.bfloat16, device="cuda",
                 options=KernelOptions(dq_ws=True, dq_ws_v2_min_len=0))
    assert calls, "the Gluon dQ kernel did not run"
    assert_close(errs, torch.bfloat16)


@gpu
@needs_sm90
@needs_triton
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_gluon_dq_equals_triton_dq(variant):
    """Both dQ kernels take 64-query by 64-key tiles, the key blocks in the same order (the
    diagonal last) and the same products and roundings per tile, so dQ is bitwise equal."""
    op = OPS[variant][0]
    x = {n: torch.tensor(a, dtype=torch.bfloat16, device="cuda", requires_grad=True)
         for n, a in inputs(variant, 2, 777, 4, 2, 64, 12).items()}
    out = op(**x, impl="fused")
    do = torch.randn_like(out)
    grads = {}
    for ws in (True, False):
        options = KernelOptions(dq_ws=ws, dq_ws_v2_min_len=0)
        grads[ws] = torch.autograd.grad(op(**x, impl="fused", options=options), x["q"], do)[0]
    assert torch.equal(grads[True], grads[False])


@gpu
@needs_sm90
@needs_triton
@pytest.mark.parametrize("k_step", [1, 2])
def test_gluon_dq_op_passes_opcheck(k_step):
    from backends.cuda.ops.paired import launch as ps
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    dv, kh = (64, 1) if k_step == 1 else (128, 2)
    q, k, v, do = r(1, 130, 4, 64), r(1, 130, kh, 64), r(1, 130, 1, dv), r(1, 130, 2, dv)
    lam = torch.rand(1, 130, 2, device="cuda", dtype=torch.bfloat16)
    out, o2, lse = ps.forward(q, k, v, lam, k_step, k_step == 1)
    _, _, _, delta = ps.backward(do, q, k, v, lam, out, o2, lse, k_step, k_step == 1)
    torch.library.opcheck(torch.ops.diffattn.paired_dq_ws.default, (do, q, k, v, lam, lse, delta, k_step))


@gpu
@needs_sm90
@needs_triton
def test_gluon_dkdv_op_passes_opcheck():
    from backends.cuda.ops.paired import launch as ps
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = r(1, 130, 4, 64), r(1, 130, 1, 64), r(1, 130, 1, 64), r(1, 130, 2, 64)
    lam = torch.rand(1, 130, 2, device="cuda", dtype=torch.bfloat16)
    out, o2, lse = ps.forward(q, k, v, lam, 1, True)
    _, _, _, delta = ps.backward(do, q, k, v, lam, out, o2, lse, 1, True)
    torch.library.opcheck(torch.ops.diffattn.paired_dkdv_ws.default, (do, q, k, v, lam, lse, delta))


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("variant", ["diff_v1", "diff_v2"])
def test_fused_gpu_under_torch_compile(variant):
    """torch.compile (inductor) traces into the triton ops: its generated code launches the four
    kernels itself (no call back into the op's Python launcher), with eager's output and gradients."""
    from torch._inductor.utils import run_and_get_code

    options = KernelOptions(dq_ws_v2_min_len=0)  # V2's Gluon dQ as an opaque op too
    op = OPS[variant][0]
    x = {n: torch.tensor(a, dtype=torch.bfloat16 if a.ndim == 3 or n != "lam" else torch.float32, device="cuda",
                         requires_grad=True) for n, a in inputs(variant, 2, 333, 4, 2, 64, 9).items()}

    def loss(q, k, v, lam):
        return (op(q, k, v, lam, "fused", options=options).float() ** 2).sum()

    eager = torch.autograd.grad(loss(**x), list(x.values()))
    compiled_loss = torch.compile(loss, fullgraph=True)
    compiled, code = run_and_get_code(lambda: torch.autograd.grad(compiled_loss(**x), list(x.values())))
    code = "\n".join(code)
    gluon = gluon_ops(variant, x, options)
    for kernel in ("paired_attention_fwd", "paired_attention_bwd_delta") + (
            () if "paired_dkdv_ws" in gluon else ("paired_attention_bwd_dkdv", )) + (
            () if "paired_dq_ws" in gluon else ("paired_attention_bwd_dq", )):
        assert kernel in code, f"{kernel} not launched by inductor's code"
    # an opaque op would run the Python launcher per call; only the Gluon kernels' launches must be
    calls = set(re.findall(r"torch\.ops\.diffattn\.(\w+)", code))
    assert calls == gluon, calls
    for a, b in zip(compiled, eager):
        assert rel(a.double().cpu(), b.double().cpu().numpy()) <= 1e-2


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("variant, normed", [("diff_v1", False), ("diff_v1", True), ("diff_v2", False)])
def test_fused_kernels_write_only_their_outputs_under_torch_compile(variant, normed):
    """torch.compile's functional form of a kernel launch copies every argument its mutation
    analysis takes for written. The four launches may write only the buffers the launcher
    allocates; an input among them would be copied before every launch (Q was, while the helper
    whose results address the stores took Q as an argument)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    op, backend = OPS[variant][0], AotEagerAndRecordGraphs()
    x = {n: torch.tensor(a, dtype=torch.bfloat16 if a.ndim == 3 or n != "lam" else torch.float32, device="cuda",
                         requires_grad=True) for n, a in inputs(variant, 1, 130, 4, 2, 64, 3).items()}
    norm = {"norm": (torch.rand(x["v"].shape[-1], device="cuda") + 0.5, 1e-5)} if normed else {}
    # aot_eager replays the launches without the launcher that sets Triton's allocator (a context
    # variable) for the TMA kernels' descriptors, and Inductor's code sets it itself; one eager
    # backward sets it in autograd's thread, as any eager step does
    torch.autograd.grad(op(**x, impl="fused", **norm).float().sum(), list(x.values()))
    # dynamic: batch and length symbolic, as torch.compile makes them after a shape change
    loss = torch.compile(lambda q, k, v, lam: (op(q, k, v, lam, "fused", **norm).float() ** 2).sum(), backend=backend,
                         fullgraph=True, dynamic=True)
    torch.autograd.grad(loss(**x), list(x.values()))
    written = [node.kwargs["tensors_to_clone"] for g in backend.fw_graphs + backend.bw_graphs for node in g.graph.nodes
               if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(written) == 4 - len(gluon_ops(variant, x, KernelOptions()))  # forward, deltas, dK/dV and dQ where Triton's
    outputs = {"OUT", "O2", "LSE", "DELTA", "DK", "DV_", "DQ"} | ({"Y", "DX", "DW_PART"} if normed else set())
    assert all(set(w) <= outputs for w in written), written


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["vanilla", "diff_v1", "diff_v2"])
@pytest.mark.parametrize("impl", ["naive", "composed"])
def test_reference_impls_gpu(variant, impl):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_close(check(variant, impl, 2, 300, 4, 2, 64, torch.float32, device="cuda"), torch.float32)


# ---- split_heads: the fused path's q, k, v from the qkv projection ---------------------------------

def split_heads_case(B, L, heads, d, dv, device, seed=0):
    """A projection output, Rotary tables longer than L, and gradients of the three outputs (dq in
    the (B, H, L, d) layout an attention backward may give, read through a transposed view)."""
    from backends.cuda.model import Rotary

    g = torch.Generator().manual_seed(seed)
    qh, kh, vh = heads
    qkv = torch.randn(B, L, (qh + kh) * d + vh * dv, generator=g, dtype=torch.float64)
    grads = (torch.randn(B, qh, L, d, generator=g, dtype=torch.float64).transpose(1, 2),
             torch.randn(B, L, kh, d, generator=g, dtype=torch.float64), torch.randn(B, L, vh, dv, generator=g,
                                                                                      dtype=torch.float64))
    return qkv, grads, Rotary(d, 10000.0, L + 9).to(device)


def split_heads_reference(qkv, grads, rotary, heads, d):
    """float64: model.Rotary (the composed path's RoPE) on views of the split projection, and autograd."""
    qh, kh, vh = heads
    qkv = qkv.clone().requires_grad_(True)
    B, L, C = qkv.shape
    q, k, v = qkv.split([qh * d, kh * d, C - (qh + kh) * d], -1)
    outs = (rotary.double()(q.view(B, L, qh, d)), rotary.double()(k.view(B, L, kh, d)), v.view(B, L, vh, -1))
    return outs, torch.autograd.grad(outs, qkv, grads)[0]


@needs_triton
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs a GPU or the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, d, dv", [((4, 2, 2), 16, 24), ((16, 16, 8), 64, 128)])
def test_split_heads_is_rotary_on_the_split_projection(dtype, heads, d, dv):
    """Outputs and the projection's gradient against float64 Rotary; L (70) is not a multiple of
    the kernel's 64 rows, the v width (24) not a power of two, k has fewer heads than q (GQA).
    Errors: float32 1e-5 (one rounding of each input and product: ~1e-7); 16-bit 2e-2 (one
    rounding of each output: ~2e-3 for bf16)."""
    from backends.cuda.ops import split_heads

    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the interpreter's bf16 is numpy float32 reinterpreted; the GPU run covers bf16")
    if d == 64 and INTERPRETED:
        pytest.skip("stage1's widths run on the GPU; the interpreter takes the small case")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qkv, grads, rotary = split_heads_case(2, 70, heads, d, dv, device)
    ref_outs, ref_grad = split_heads_reference(qkv.to(device), [g.to(device) for g in grads], rotary, heads, d)
    x = qkv.to(device, dtype).requires_grad_(True)
    cos, sin = rotary.float().tables(70)
    outs = split_heads(x, cos, sin, *heads, d)
    for out, ref in zip(outs, ref_outs):
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        assert rel(out.detach().double().cpu(), ref.detach().cpu().numpy()) <= TOL[dtype]
    grad = torch.autograd.grad(outs, x, [g.to(device, dtype) for g in grads])[0]
    assert grad.shape == x.shape and rel(grad.double().cpu(), ref_grad.cpu().numpy()) <= TOL[dtype]


@needs_triton
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs a GPU or the interpreter")
def test_split_heads_passes_opcheck():
    from backends.cuda.ops import split_heads

    device = "cuda" if torch.cuda.is_available() else "cpu"
    qkv, grads, rotary = split_heads_case(1, 19, (2, 2, 1), 16, 32, device)
    cos, sin = rotary.float().tables(19)
    args = (qkv.float().to(device).requires_grad_(True), cos, sin, 2, 2, 1, 16)
    split_heads(*args)  # imports the module that registers the ops
    torch.library.opcheck(torch.ops.diffattn.split_heads.default, args)
    torch.library.opcheck(torch.ops.diffattn.split_heads_bwd.default,
                          (*(g.float().to(device) for g in grads), cos, sin))


@needs_triton
@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs a GPU or the interpreter")
def test_split_heads_bad_inputs_are_one_line_errors():
    from backends.cuda.ops import split_heads

    cos = torch.zeros(8, 8)
    for qkv, tables, needle in [(torch.zeros(1, 8, 60), (cos, cos), "do not hold"),  # 2 + 2 heads of 16 need 64
                                (torch.zeros(1, 8, 100), (cos[:5], cos[:5]), "tables"),  # 5 positions for L = 8
                                (torch.zeros(1, 8, 100), (cos, cos[:, :4]), "tables")]:
        with pytest.raises(ValueError, match=needle) as e:
            split_heads(qkv, *tables, 2, 2, 1, 16)
        assert "\n" not in str(e.value)


@gpu
@needs_cuda
@needs_triton
def test_split_heads_under_torch_compile():
    """Inductor launches rope_heads itself with eager's result, and its mutation analysis (dynamic
    shapes) takes only what the op allocates, `dst`, for written: the projection is never copied."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    from torch._inductor.utils import run_and_get_code

    from backends.cuda.ops import split_heads

    qkv, grads, rotary = split_heads_case(2, 333, (16, 16, 8), 64, 128, "cuda")
    x, cos_sin = qkv.to("cuda", torch.bfloat16).requires_grad_(True), rotary.float().tables(333)

    def loss(x):
        return sum((t.float() ** 2).sum() for t in split_heads(x, *cos_sin, 16, 16, 8, 64))

    eager = torch.autograd.grad(loss(x), x)[0]
    compiled_loss = torch.compile(loss, fullgraph=True)
    (compiled,), code = run_and_get_code(lambda: torch.autograd.grad(compiled_loss(x), x))
    assert "rope_heads" in "\n".join(code) and "torch.ops.diffattn" not in "\n".join(code)
    assert rel(compiled.double().cpu(), eager.double().cpu().numpy()) <= 1e-2
    backend = AotEagerAndRecordGraphs()
    torch.autograd.grad(torch.compile(loss, backend=backend, fullgraph=True, dynamic=True)(x), x)
    written = [node.kwargs["tensors_to_clone"] for g in backend.fw_graphs + backend.bw_graphs for node in g.graph.nodes
               if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(written) == 6 and all(set(w) <= {"dst"} for w in written), written  # 3 parts each way
