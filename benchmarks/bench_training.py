"""Whole training steps (forward, backward, clip, AdamW) through the Backend protocol.

Grid: backend (mlx, torch) x variant x preset. "tiny" runs everywhere (cheap enough for CI's CPU),
"stage0" and "stage1" need a GPU. stage1 (B 8, L 2048) is issue 7's target-5 step: on the torch
backend its blocks are torch.compile'd and the step replays as one CUDA graph, as
benchmarks/scripts/train_step_table.py's stage1 rows run it; every other row runs the eager step.
Batches are random tokens (throughput does not depend on their values); kernels="auto" (fused on
a GPU, composed on a CPU); dtype bfloat16 on a GPU (torch: autocast with float32 master weights),
float32 on a CPU.

`time_train_step` / `peakmem_train_step`: one step per call, synchronized by reading the loss
(and torch.cuda.synchronize on CUDA). `track_*` come from one pass in setup_cache: tokens/s
(higher is better), MFU (higher is better; diffattn.flops' count, causal attention, over
flops.peak_flops: the datasheet peak of a GPU in that dtype, skipped for a GPU without one, and
the measured matmul rate on a CPU), a DIFF variant's
tokens/s over its vanilla twin's in the same run (higher is better; target 5 wants >= 0.92 at
stage1) and the allocator's peak device bytes (over the timed steps; for a step replayed as a CUDA
graph, over its eager warm-up and recording, as train_step_table.py counts it: replays allocate
nothing. At d22ba4d, the first commit with stage1, the graph rows counted the replays only).
tokens/s is tokens per step over the median of the same `_Case.step` that time_train_step times,
refused (a failure, no number) where the loop's own wall clock disagrees with that median beyond
the samples' noise, or, on a CPU, where other processes held the cores (_common.median_seconds); `diffattn report` cross-checks it against
time_train_step, which asv measures in other processes (docs/benchmarks.md, "Trusting a figure").
"""

from . import _common as C

PRESETS = {  # name: (batch, seqlen)
    "tiny": (8, 64),
    "stage0": (8, 1024),
    "stage1": (8, 2048),
}
GPU_ONLY_PRESETS = ("stage0", "stage1")
TORCH_OPTIONS = {"stage1": dict(compile=True, graphs=True)}  # the cuda backend's options per preset


def _backend_options(backend, preset):
    """The backend's create() options of a row: TORCH_OPTIONS' on torch, none on MLX."""
    return TORCH_OPTIONS.get(preset, {}) if backend == "torch" else {}
LR = 1e-3

_CASES = {}


class _Case:
    def __init__(self, backend, variant, preset):
        import numpy as np

        from diffattn.config import preset as make_config
        from diffattn.params import init_params

        batch, seqlen = PRESETS[preset]
        rt = C.Runtime(backend, need_gpu=preset in GPU_ONLY_PRESETS)
        cfg = make_config(preset, attention=variant)
        options = _backend_options(backend, preset)
        self.model = C.load_backend(rt, **options).build(cfg, init_params(cfg, seed=0))
        rng = np.random.default_rng(0)
        self.batches = [rng.integers(0, cfg.vocab_size, (batch, seqlen + 1)) for _ in range(4)]
        self.rt, self.cfg, self.tokens_per_step, self.seqlen, self.i = rt, cfg, batch * seqlen, seqlen, 0
        warmup = 1  # outside any clock: the first step compiles / autotunes
        if options.get("graphs"):
            from backends.cuda.train import StepGraph
            warmup = StepGraph.STEPS_TO_STEADY
        for _ in range(warmup):
            self.step()

    def step(self):
        self.i += 1
        loss = float(self.model.train_step(self.batches[self.i % len(self.batches)], LR))
        self.rt.sync()
        return loss


def _case(*key):
    if key not in _CASES:
        _CASES[key] = _Case(*key)
    return _CASES[key]


class TrainStep:
    params = (list(C.BACKENDS), list(C.VARIANTS), list(PRESETS))
    param_names = ["backend", "variant", "preset"]
    rounds = 1
    repeat = (2, 5, 1.5)
    warmup_time = 0.3
    timeout = 300
    version = "1"

    def setup(self, backend, variant, preset):
        self.case = _case(backend, variant, preset)

    def time_train_step(self, *params):
        self.case.step()

    def peakmem_train_step(self, *params):
        self.case.step()


def _measure(backend, variant, preset):
    graphs = _backend_options(backend, preset).get("graphs", False)
    if graphs:  # a replay allocates nothing (activations live in the graph's pool): the peak is the recording's
        C.Runtime(backend, need_gpu=True).reset_peak_memory()
    case = _Case(backend, variant, preset)
    rt = case.rt
    if not graphs:  # the steady state, after the first step's compile / autotune
        rt.reset_peak_memory()
    seconds = C.median_seconds(case.step, lambda _: None, budget_s=2.0, max_reps=30, on_cpu=not rt.gpu)
    out = {"tokens_per_second": case.tokens_per_step / seconds, "device_peak_bytes": rt.peak_memory()}
    try:
        out["mfu"] = C.flops.mfu(case.cfg, case.seqlen, out["tokens_per_second"], rt.peak_flops())
    except C.Skip as e:
        out["mfu_skip"] = str(e)
    return out


def _vs_vanilla(cache: dict) -> dict:
    """Each DIFF variant's tokens/s over its vanilla twin's (same backend and preset, same run)."""
    for (backend, variant, preset), entry in cache.items():
        twin = cache.get((backend, "vanilla", preset), {})
        if variant != "vanilla" and "tokens_per_second" in entry and "tokens_per_second" in twin:
            entry["vs_vanilla"] = entry["tokens_per_second"] / twin["tokens_per_second"]
    return cache


class TrainThroughput:
    """Steady-state throughput of every combination, measured once per run in setup_cache."""
    params = TrainStep.params
    param_names = TrainStep.param_names
    timeout = 1200
    version = "1"

    def setup_cache(self):
        keys = [(b, v, p) for b in C.BACKENDS for v in C.VARIANTS for p in PRESETS]
        return _vs_vanilla(C.measure_all(keys, _measure))

    def setup(self, cache, backend, variant, preset):
        self.entry = C.cached_entry(cache, (backend, variant, preset))

    def track_tokens_per_second(self, cache, *params):
        return self.entry["tokens_per_second"]
    track_tokens_per_second.unit = "tokens/s"

    def track_mfu(self, cache, *params):
        if "mfu" not in self.entry:
            raise C.Skip(self.entry.get("mfu_skip", "no MFU"))
        return self.entry["mfu"]
    track_mfu.unit = "MFU"

    def track_tokens_per_second_vs_vanilla(self, cache, backend, variant, preset):
        if variant == "vanilla":
            raise C.Skip("vanilla is the twin the others are measured against")
        if "vs_vanilla" not in self.entry:
            raise C.Skip(f"{backend} {preset}: the vanilla twin was not measured")
        return self.entry["vs_vanilla"]
    track_tokens_per_second_vs_vanilla.unit = "x vanilla"

    def track_device_peak_bytes(self, cache, *params):
        value = self.entry["device_peak_bytes"]
        if value != value:
            raise C.Skip(f"{params[0]}: no device memory counter on this machine")
        return value
    track_device_peak_bytes.unit = "bytes"
