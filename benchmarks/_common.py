"""Plumbing shared by the asv suite (private: asv instantiates only public classes it finds).

Rules every benchmark here keeps:
- `params` are literals, the same on every machine. What a machine lacks (a framework, a GPU, a
  kernel) is a skip: `setup` raises NotImplementedError, which asv records as skipped (NaN).
- Module level imports only the standard library and numpy (and diffattn.flops, by its path): asv spawns one process per
  benchmark and parameter combination, and frameworks are imported in `setup` only.
- Timed bodies end with `Runtime.sync(...)`: torch.cuda.synchronize() on CUDA, mx.eval(...) on
  MLX; lazy or asynchronous work is never left outside the clock.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import statistics
import time

# torch's CPU build runs every parallel region on an OpenMP team of one thread per core whose
# threads spin at the region's barrier. On a shared 2-core machine any other process then turns
# each of a training step's hundreds of barriers into lost time slices: a tiny-preset step read
# 972 ms instead of 54 (one thread) or 30 (passive wait) under the same load, and the slowdown
# comes and goes with the other load, so two figures of one combination taken at different moments
# disagreed 72x (docs/benchmarks.md, "Trusting a figure"). Waiting passively keeps both threads and
# loses nothing on an idle machine. Set before any framework loads: benchmark processes import
# torch in setup, after this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _suite_flops():
    """diffattn/flops.py of the tree this suite belongs to, loaded by its path: one FLOP convention
    for asv, `train` and the tables, and the same one for every commit asv measures (the history
    puts an older commit's diffattn first on the path, which may predate diffattn.flops)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffattn", "flops.py")
    spec = importlib.util.spec_from_file_location("_diffattn_suite_flops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flops = _suite_flops()
FWD_BWD_FACTOR, attention_forward_flops = flops.FWD_BWD_FACTOR, flops.attention_forward_flops

BACKENDS = ("mlx", "torch")  # the two stacks; "torch" is diffattn.backend.load("cuda", ...)
REGISTRY_NAME = {"mlx": "mlx", "torch": "cuda"}
FRAMEWORK = {"mlx": "mlx", "torch": "torch"}
VARIANTS = ("vanilla", "diff", "diff_v2")
IMPLS = ("naive", "composed", "fused")

try:  # asv_runner's skip also counts when raised in a benchmark body, not only in setup
    from asv_runner.benchmarks.mark import SkipNotImplemented as _SkipBase
except ImportError:  # imported outside asv (tests, scripts)
    _SkipBase = NotImplementedError


class Skip(_SkipBase):
    """This machine cannot run a combination: asv records a skip (NaN), never a number."""


def _gpu_plausible(backend: str) -> bool:
    """Cheap negative test, before any framework import: False means surely no GPU for backend."""
    if backend == "mlx" and platform.system() == "Darwin":
        return platform.machine() == "arm64"
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


class Runtime:
    """One framework on this machine's best device: which device, the dtype benchmarks use there,
    and how to wait for queued work."""

    def __init__(self, backend: str, need_gpu: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
        if need_gpu and not _gpu_plausible(backend):
            raise Skip(f"{backend}: this combination needs a GPU and the machine has none")
        if importlib.util.find_spec(FRAMEWORK[backend]) is None:
            raise Skip(f"{backend}: {FRAMEWORK[backend]} is not installed")
        self.backend = backend
        if backend == "torch":
            import torch

            self.fw = torch
            self.gpu = torch.cuda.is_available()
            self.device = "cuda" if self.gpu else "cpu"
            self.device_name = torch.cuda.get_device_name() if self.gpu else platform.processor() or "cpu"
        else:
            import mlx.core as mx

            self.fw = mx
            self.gpu = mx.default_device() == mx.gpu
            self.device = "gpu" if self.gpu else "cpu"
            self.device_name = _mlx_device_name(mx) if self.gpu else platform.processor() or "cpu"
        if need_gpu and not self.gpu:
            raise Skip(f"{backend}: this combination needs a GPU and {FRAMEWORK[backend]} sees none")
        # GPU: bf16, the dtype kernels are written for; CPU: float32 (bf16 is emulated there)
        self.dtype = "bfloat16" if self.gpu else "float32"

    def sync(self, *outputs):
        """Block until `outputs` (and, on CUDA, everything queued) are computed."""
        if self.backend == "torch":
            if self.gpu:
                self.fw.cuda.synchronize()
        else:
            self.fw.eval(*outputs)

    def reset_peak_memory(self):
        if self.backend == "torch":
            if self.gpu:
                self.fw.cuda.reset_peak_memory_stats()
        else:
            self.fw.reset_peak_memory()

    def peak_memory(self) -> float:
        """Peak device memory held by the framework's allocator since the last reset, in bytes
        (NaN for torch on a CPU, whose allocator keeps no such count)."""
        if self.backend == "torch":
            return float(self.fw.cuda.max_memory_allocated()) if self.gpu else float("nan")
        return float(self.fw.get_peak_memory())

    def peak_flops(self) -> float:
        """The MFU denominator, diffattn.flops.peak_flops: a GPU's datasheet figure by name (NVIDIA,
        Apple M-series), else this framework's measured matmul rate (CPUs); a GPU with no entry is a
        skip, so GPU MFU is always against a datasheet."""
        peak, source = flops.peak_flops(self.device_name, self.dtype, FRAMEWORK[self.backend], self.gpu)
        if self.gpu and source.startswith("measured"):
            raise Skip(f"{self.backend}: no datasheet peak for {self.device_name!r} in {self.dtype}, so no MFU")
        return peak

    def random(self, shape, seed: int, low: float | None = None, high: float | None = None, dtype=None):
        """A tensor of the framework, drawn on its device (fast at GPU sizes) in dtype (default
        self.dtype): standard normal, or uniform(low, high)."""
        dtype = dtype or self.dtype
        if self.backend == "torch":
            torch = self.fw
            gen = torch.Generator(device=self.device).manual_seed(seed)
            x = torch.randn(shape, generator=gen, device=self.device) if low is None else \
                torch.rand(shape, generator=gen, device=self.device) * (high - low) + low
            return x.to(getattr(torch, dtype))
        mx = self.fw
        key = mx.random.key(seed)
        x = mx.random.normal(shape, key=key) if low is None else mx.random.uniform(low, high, shape, key=key)
        return x.astype(getattr(mx, dtype))


def _mlx_device_name(mx) -> str:
    try:
        return str(mx.device_info().get("device_name", "gpu"))
    except Exception:  # older MLX: metal.device_info only
        return "gpu"


def import_ops(backend: str):
    """The attention ops module of a backend; a backend that has not landed them is a skip."""
    name = f"backends.{REGISTRY_NAME[backend]}.ops"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise Skip(f"{backend}: {name} does not exist yet") from None
        raise


def load_backend(rt: Runtime, kernels: str = "auto", dtype: str | None = None, **options):
    """diffattn.backend.load for this runtime's device (options: the cuda backend's compile and
    graphs); a backend not written yet is a skip."""
    from diffattn import backend

    module = backend.REGISTRY[REGISTRY_NAME[rt.backend]][0]
    mod = importlib.import_module(module)
    if not hasattr(mod, "create"):
        raise Skip(f"{rt.backend}: {module} has no create() yet")
    device = {"torch": rt.device, "mlx": None}[rt.backend]
    return backend.load(REGISTRY_NAME[rt.backend], device=device, dtype=dtype or rt.dtype, kernels=kernels, **options)


def warm_gpu(seconds: float = 2.0) -> None:
    """Keep a CUDA GPU busy with bf16 matmuls for `seconds`, so its clocks have left idle (345 MHz
    on a fresh H200) before anything is timed: without it the first timings of a process read up
    to 2x slow (docs/kernels.md, sweep 11)."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def _nvml():
    """(pynvml, GPU 0's handle, the current-reasons query, the reason constants' prefix); NVML's
    newer names say "clocks event reasons", older ones "clocks throttle reasons". Raises where NVML
    (nvidia-ml-py) is missing or does not answer."""
    import pynvml

    pynvml.nvmlInit()
    kind = "Event" if hasattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons") else "Throttle"
    return (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), getattr(pynvml, f"nvmlDeviceGetCurrentClocks{kind}Reasons"),
            f"nvmlClocks{kind}Reason")


def gpu_clocks() -> dict:
    """The GPU's SM clock now (MHz) and NVML's reasons for holding it below its maximum (power cap,
    thermal, idle, ...), for a timing to be read against; {} where NVML is missing or does not answer."""
    try:
        pynvml, handle, query, prefix = _nvml()
        reasons = query(handle)
        held = sorted(name[len(prefix):] for name in dir(pynvml) if name.startswith(prefix)
                      and name[len(prefix):] not in ("All", "None") and isinstance(getattr(pynvml, name), int)
                      and reasons & getattr(pynvml, name))
        return {"sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM), "held_by": held}
    except Exception:  # no NVML here: the row goes without
        return {}


class GpuSampler:
    """Samples GPU 0's SM clock, board power and NVML's power-cap reason every `period` seconds on a
    thread while the `with` block runs; .summary() -> {"sm_mhz", "watts", "power_capped", "joules"}
    (means; power_capped the share of samples NVML held the clock for the software power cap;
    joules the board's energy counter over the block), or {} where NVML is missing. A timing held
    at a lower clock by the power cap is energy-bound: work that only fills idle time then buys
    less than it does alone."""

    def __init__(self, period: float = 0.01):
        self.period, self.samples, self._stop = period, [], None

    def __enter__(self):
        import threading

        try:
            pynvml, handle, query, prefix = _nvml()
            cap = getattr(pynvml, prefix + "SwPowerCap")
        except Exception:  # no NVML here: no samples
            return self
        self._stop = threading.Event()
        self._energy = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ -> J
        self._joules = self._energy()

        def poll():
            while not self._stop.is_set():
                self.samples.append((pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                                     pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, bool(query(handle) & cap)))
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._joules = self._energy() - self._joules
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        mhz, watts, capped = zip(*self.samples)
        return {"sm_mhz": statistics.fmean(mhz), "watts": statistics.fmean(watts),
                "power_capped": statistics.fmean(capped), "joules": self._joules}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """The dense bf16 matmul rate on this CUDA GPU, TFLOP/s: an n^3 product of random data after
    warm_gpu(), CUDA events, median of reps after 3 warm-ups. The reference of the tables' MFU."""
    import torch

    warm_gpu()  # timed first in a run: the clocks must have left idle
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


class Untrusted(RuntimeError):
    """Two timings of the same calls in one process disagree by more than their measured noise:
    the machine's load changed under the measurement, and no figure is reported."""


TRUST_FLOOR = 0.10  # disagreement always allowed: a stable step's mean sits a few % above its median
# Work on a CPU keeps at least one core busy: a process that ran less than half the loop's wall
# time was waiting for cores other processes held, and its timing measures them.
MIN_CPU_SHARE = 0.5


def median_seconds(fn, sync, budget_s: float = 0.5, min_reps: int = 3, max_reps: int = 100,
                   on_cpu: bool = False, clock=time.perf_counter, cpu_clock=time.process_time) -> float:
    """Median wall time of fn() with a sync after every call, after one untimed warm-up call.
    Runs at least min_reps and stops at max_reps or once budget_s is spent.

    Cross-checked before it is returned: the loop's own wall time over its calls (what a
    throughput over the whole loop would say) must agree with the median within
    max(TRUST_FLOOR, 2 x the samples' interquartile range over their median), and work `on_cpu`
    must have had this process running for MIN_CPU_SHARE of the loop; otherwise Untrusted
    (measure_all records it, and the track reports a failure instead of a number)."""
    sync(fn())
    times = []
    start, cpu_start = clock(), cpu_clock()
    while len(times) < max_reps and (len(times) < min_reps or clock() - start < budget_s):
        t0 = clock()
        sync(fn())
        times.append(clock() - t0)
    wall, cpu = clock() - start, cpu_clock() - cpu_start
    check_timings(times, wall)
    if on_cpu and not cpu >= MIN_CPU_SHARE * wall:
        raise Untrusted(f"the process ran {cpu / wall:.0%} of the timed loop's wall time ({len(times)} calls): "
                        "other processes held the cores")
    return statistics.median(times)


def check_timings(times: list[float], total: float) -> dict:
    """{"median", "mean_over_loop", "noise"} of per-call samples and the loop's total wall time;
    raises Untrusted when the two per-call figures disagree by more than the noise allows."""
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) >= 2 else (median, median, median)
    noise = (q3 - q1) / median if median > 0 else float("inf")
    over_loop = total / len(times)
    allowed = max(TRUST_FLOOR, 2 * noise)
    if not abs(over_loop / median - 1) <= allowed:
        raise Untrusted(f"{len(times)} calls: median {median * 1e3:.3g} ms but {over_loop * 1e3:.3g} ms per call "
                        f"over the loop ({over_loop / median:.2f}x; noise {noise:.0%}, allowed {allowed:.0%}): "
                        "the machine's load changed during the measurement")
    return {"median": median, "mean_over_loop": over_loop, "noise": noise}


def cached_entry(cache: dict, key: tuple):
    """Look up a setup_cache measurement: a skip reason becomes a skip, a recorded error a failure."""
    entry = cache.get(key)
    if entry is None:
        raise Skip(f"{key}: not measured")
    if "skip" in entry:
        raise Skip(entry["skip"])
    if "error" in entry:
        raise RuntimeError(entry["error"])
    return entry


def measure_all(keys, measure_one) -> dict:
    """Run measure_one(*key) for every key, keeping skips and errors per key (one bad combination
    must not hide the others). Values are plain floats and strings so the pickled cache needs no framework."""
    out = {}
    for key in keys:
        try:
            out[key] = {k: v if isinstance(v, str) else float(v) for k, v in measure_one(*key).items()}
        except NotImplementedError as e:
            out[key] = {"skip": str(e)}
        except Exception as e:  # recorded, then reported by the track as a failure
            out[key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        release_memory()
    return out


def release_memory():
    """Hand cached device memory back between combinations measured in one process: one
    framework's allocator cache must not starve the next (on the H100, MLX's cache once left
    torch's naive DIFF V2 at L=4096 out of memory)."""
    import gc
    import sys

    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].clear_cache()


# ---- sizes and FLOP counts ------------------------------------------------------------------

def attention_layout(variant: str, d_model: int, vanilla_heads: int, seqlen: int = 64):
    """The head layout of `variant` matched to a vanilla model of `vanilla_heads` heads (the
    config's twin rule: identical q/k/v/out projection shapes; diff_v2 doubles the q heads)."""
    from diffattn.config import ModelConfig

    return ModelConfig(d_model=d_model, n_heads=vanilla_heads, attention="vanilla", max_seq_len=seqlen).twin(variant)



def kernel_option_args(ap):
    """The fused kernels' --kernel-options and --tiles of the benchmark scripts (an A/B in one call)."""
    ap.add_argument("--kernel-options", default="", help="KEY=VALUE+...: the fused kernels' launch options "
                    "(KernelOptions, as kernels_sweep.py writes them), e.g. dq_ws=0 for an A/B")
    ap.add_argument("--tiles", default="", help="KERNEL:D:DV=BM,BN,warps,stages+...: bf16 tiles over the "
                    "tuned ones (KernelOptions.tiles), e.g. dkdv:64:128=32,128,8,3 for an A/B")


def kernel_options(options_text="", tiles_text=""):
    """--kernel-options and --tiles as one KernelOptions (the defaults where both are empty); a bad
    option or tile stops the script with a one-line message."""
    from backends.cuda.ops.paired import tuning

    try:
        return tuning.parse_tiles(tiles_text, tuning.parse_options(options_text))
    except (ValueError, TypeError) as e:
        raise SystemExit(str(e)) from None
