"""Attention cores alone: forward and forward+backward time and peak memory, and TFLOP/s.

Grid: backend (mlx, torch) x impl (naive, composed, compiled, fused) x variant x shape; compiled is
the composed path under the framework's compiler (torch.compile: Inductor fuses DIFF's combine
around the SDPA calls; mx.compile), the strongest baseline a fused kernel has to beat. Shapes are named
batch-seqlen-d_model; every variant is the twin of a vanilla layer of that d_model with head_dim 64
(config.twin: DIFF V1 has half the heads with v 2d wide, DIFF V2 twice the query heads).
The large shape and every fused kernel need a GPU and are skipped on a CPU. On a GPU the inputs
are bfloat16, on a CPU float32 (Runtime.dtype).

`time_*` and `peakmem_*` run one process per combination (asv's own statistics; peakmem_ is the
host process's max RSS, setup included). The `track_*` figures come from one measurement pass in
`setup_cache` (median of synchronized calls): TFLOP/s by FlashAttention's FLOP convention
(_common.attention_forward_flops, forward+backward = 3.5x forward), higher is better, and the
framework allocator's peak device bytes over a forward+backward.

DIFF V1 is timed as the model runs it: the attention core followed by its subln (RMSNorm over
each output row, eps the config's norm_eps, weight a float32 parameter of 2d that gets its
gradient too); the fused torch kernels apply it in their epilogue.
"""
from . import _common as C

SHAPES = {  # name: (batch, seqlen, d_model, vanilla heads)
    "B2-L128-d256": (2, 128, 256, 4),
    "B2-L4096-d2048": (2, 4096, 2048, 32),
}
GPU_ONLY_SHAPES = ("B2-L4096-d2048",)
OP_NAME = {"vanilla": "vanilla_attention", "diff": "diff_v1_attention", "diff_v2": "diff_v2_attention"}
IMPLS = ("naive", "composed", "compiled", "fused")  # C.IMPLS and the compiled composed path; fused last (setup_cache)

_CASES = {}  # asv re-runs setup before every timed call: build each case once per process


class _Case:
    """Inputs, and forward / forward+backward closures, of one combination on this machine."""

    def __init__(self, backend, impl, variant, shape):
        batch, seqlen, d_model, heads = SHAPES[shape]
        # torch.compile on a CPU would compile for seconds in every asv process: GPU-only there
        rt = C.Runtime(backend, need_gpu=shape in GPU_ONLY_SHAPES or impl == "fused"
                       or (backend, impl) == ("torch", "compiled"))
        cfg = C.attention_layout(variant, d_model, heads, seqlen)
        op = _attention_op(backend, impl, variant, cfg.norm_eps)
        hd = cfg.head_dim
        inputs = [rt.random((batch, seqlen, cfg.q_heads, hd), 1),
                  rt.random((batch, seqlen, cfg.k_heads, hd), 2),
                  rt.random((batch, seqlen, cfg.kv_heads, cfg.v_head_dim), 3)]
        if variant == "diff":
            inputs.append(rt.random((), 4, 0.1, 0.9))
            inputs.append(rt.random((cfg.v_head_dim,), 6, 0.5, 1.5, dtype="float32"))  # the subln weight
        elif variant == "diff_v2":
            inputs.append(rt.random((batch, seqlen, cfg.n_heads), 4, 0.0, 1.0))
        out_shape = (batch, seqlen, cfg.n_heads, cfg.v_head_dim) if variant != "vanilla" else \
            (batch, seqlen, cfg.q_heads, hd)
        grad_out = rt.random(out_shape, 5)
        self.rt, self.cfg, self.batch, self.seqlen = rt, cfg, batch, seqlen

        if backend == "torch":
            torch = rt.fw
            leaves = [x.detach().clone().requires_grad_() for x in inputs]

            def forward():  # inference: no autograd graph
                with torch.no_grad():
                    return op(*inputs)

            def forward_backward():
                return torch.autograd.grad(op(*leaves), leaves, grad_out)
        else:
            mx = rt.fw

            def forward():
                return op(*inputs)

            def forward_backward():
                return mx.vjp(op, inputs, [grad_out])
        self.forward, self.forward_backward = forward, forward_backward
        rt.sync(self.forward())  # fails here, in setup, if the op rejects the combination
        if impl == "compiled":  # and compiles here, not in a timed call
            rt.sync(self.forward_backward())

    def forward_flops(self):
        return C.attention_forward_flops(self.cfg, self.batch, self.seqlen, causal=True)


def _attention_op(backend, impl, variant, subln_eps):
    """The attention op as the model calls it, a function of (q, k, v[, lam[, subln weight]]): DIFF
    V1 with its subln (subln_eps); an impl that is only another name for the composed path (no
    kernel of its own) is skipped rather than timed twice."""
    ops = C.import_ops(backend)
    if backend == "torch":
        import torch

        if impl == "fused" and variant == "vanilla":
            raise C.Skip("torch: vanilla 'fused' is the composed SDPA call (no kernel of its own)")
        fn = getattr(ops, OP_NAME[variant])
        kind = "composed" if impl == "compiled" else impl
        if variant == "diff":
            def op(q, k, v, lam, weight):
                return fn(q, k, v, lam, impl=kind, norm=(weight, subln_eps))
        else:
            def op(*xs):
                return fn(*xs, impl=kind)
        return torch.compile(op) if impl == "compiled" else op
    import mlx.core as mx

    table = ops.IMPLS[variant]
    if impl == "fused" and table["fused"] is table["composed"]:
        raise C.Skip(f"mlx: {variant} 'fused' is the composed path (no kernel of its own)")
    core = table["composed" if impl == "compiled" else impl]
    op = core
    if variant == "diff":  # the MLX model applies subln after the op, as here
        def op(q, k, v, lam, weight):
            out = core(q, k, v, lam)
            return mx.fast.rms_norm(out, weight.astype(out.dtype), subln_eps)
    return mx.compile(op) if impl == "compiled" else op


def _case(backend, impl, variant, shape):
    key = (backend, impl, variant, shape)
    if key not in _CASES:
        _CASES[key] = _Case(*key)
    return _CASES[key]


class Attention:
    """asv statistics of single calls (synchronized) of the attention core."""
    params = (list(C.BACKENDS), list(IMPLS), list(C.VARIANTS), list(SHAPES))
    param_names = ["backend", "impl", "variant", "shape"]
    rounds = 1
    repeat = (3, 10, 1.0)
    warmup_time = 0.1
    timeout = 180
    version = "1"

    def setup(self, backend, impl, variant, shape):
        self.case = _case(backend, impl, variant, shape)

    def time_forward(self, *params):
        self.case.rt.sync(self.case.forward())

    def time_forward_backward(self, *params):
        self.case.rt.sync(self.case.forward_backward())

    def peakmem_forward(self, *params):
        self.case.rt.sync(self.case.forward())

    def peakmem_forward_backward(self, *params):
        self.case.rt.sync(self.case.forward_backward())


def _measure(backend, impl, variant, shape):
    case = _Case(backend, impl, variant, shape)
    rt = case.rt
    fwd = C.median_seconds(case.forward, rt.sync, on_cpu=not rt.gpu)
    rt.reset_peak_memory()
    fwd_bwd = C.median_seconds(case.forward_backward, rt.sync, on_cpu=not rt.gpu)
    peak = rt.peak_memory()
    flops = case.forward_flops()
    return {"tflops_forward": flops / fwd / 1e12, "tflops_forward_backward": C.FWD_BWD_FACTOR * flops / fwd_bwd / 1e12,
            "device_peak_bytes": peak}


class AttentionThroughput:
    """TFLOP/s and device memory of every combination, measured once per run in setup_cache."""
    params = Attention.params
    param_names = Attention.param_names
    timeout = 900  # setup_cache measures the whole grid
    version = "1"

    def setup_cache(self):
        # fused kernels last: a kernel that breaks the CUDA context should not hide the others
        keys = [(b, i, v, s) for i in IMPLS for b in C.BACKENDS for v in C.VARIANTS for s in SHAPES]
        return C.measure_all(keys, _measure)

    def setup(self, cache, backend, impl, variant, shape):
        self.entry = C.cached_entry(cache, (backend, impl, variant, shape))

    def track_tflops_forward(self, cache, *params):
        return self.entry["tflops_forward"]
    track_tflops_forward.unit = "TFLOP/s"

    def track_tflops_forward_backward(self, cache, *params):
        return self.entry["tflops_forward_backward"]
    track_tflops_forward_backward.unit = "TFLOP/s"

    def track_device_peak_bytes(self, cache, *params):
        value = self.entry["device_peak_bytes"]
        if value != value:  # NaN: no device allocator to ask (torch on a CPU)
            raise C.Skip(f"{params[0]}: no device memory counter on this machine")
        return value
    track_device_peak_bytes.unit = "bytes"
