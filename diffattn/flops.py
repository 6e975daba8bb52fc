"""FLOP counts and peak rates: the one place MFU comes from (`train`'s summary, asv's track_mfu,
the GPU tables).

Training FLOPs per token (`train_flops_per_token`, one convention everywhere):

    6 N                                     N = the parameters that multiply activations: all of them,
                                            the tied embedding once (as the LM head's matmul; an untied
                                            input embedding is a lookup and is left out); forward 2,
                                            backward 4 per parameter
  + 3 * n_layers * q_heads * T * (d_qk + d_v)
                                            attention per token over a causal T: each query map's
                                            QK^T (2 T d_qk) and AV (2 T d_v) over T keys, halved for
                                            causality, x3 for forward + backward

causal=False counts the attention term without the halving (x2): PaLM's and nanoGPT's 12 L H Q T
for vanilla, which asv's MFU used before this module; the tables print it as "PaLM convention".
Kernel benchmarks count one attention core (`attention_forward_flops`, FlashAttention's
convention: forward + backward = FWD_BWD_FACTOR x forward, counting the backward's recomputation).

Peak rates (`peak_flops`), dense, no sparsity:
- NVIDIA data-center GPUs by name: the datasheet's dense bf16/fp16 tensor-core rate and the fp32
  non-tensor rate (float32 runs IEEE fp32 here: TF32 is off). NVIDIA quotes tensor rates "with
  sparsity"; the figures below are half of those.
- Apple M-series GPUs by chip name: FP32 TFLOPS of the chip's largest GPU configuration (M1, M2
  families: Apple's launch figures; M3, M4: GPU cores x 128 ALUs x 2 FLOPs x clock, as reviews
  report them); a chip with fewer GPU cores reads proportionally low unless system_profiler
  reports its core count, which scales the figure. Apple GPUs run bf16/fp16 at their fp32 rate
  (no double-rate half precision in M1-M4), so every dtype takes the fp32 figure. M5's GPU adds
  matmul units with no published rate: no entry, no MFU.
- CPUs, and any device without an entry: the measured rate of a square matmul in the run's
  framework and dtype (`measured_matmul_flops`, best of a few, cached per process): MFU against
  what this machine's BLAS actually reaches, not a datasheet.
"""
from __future__ import annotations

import functools
import math
import platform
import re
import subprocess
import time

FWD_BWD_FACTOR = 3.5  # attention core forward + backward = 3.5 x forward (FlashAttention's convention)

# (pattern on the device name, dense bf16/fp16 FLOP/s, fp32 FLOP/s), most specific first
NVIDIA = [
    (r"H100.*PCIe", 756e12, 51.2e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H100|GH200", 989.4e12, 66.9e12),  # SXM5 (the name's "80GB HBM3")
    (r"H200.*NVL", 835e12, 60e12),
    (r"H200", 989.4e12, 66.9e12),  # SXM
    (r"B200", 2250e12, 75e12),  # HGX B200
    (r"A100", 312e12, 19.5e12),  # SXM4 and PCIe
    (r"L40S", 362e12, 91.6e12),
    (r"\bL40\b", 181e12, 90.5e12),
    (r"\bL4\b", 121e12, 30.3e12),
    (r"\bA10\b", 125e12, 31.2e12),
    (r"A40", 149.7e12, 37.4e12),
]
# Apple chip name -> (FP32 FLOP/s of its largest GPU, that GPU's core count)
APPLE = {
    "M1": (2.6e12, 8), "M1 Pro": (5.2e12, 16), "M1 Max": (10.4e12, 32), "M1 Ultra": (20.8e12, 64),
    "M2": (3.6e12, 10), "M2 Pro": (6.8e12, 19), "M2 Max": (13.6e12, 38), "M2 Ultra": (27.2e12, 76),
    "M3": (4.1e12, 10), "M3 Pro": (7.4e12, 18), "M3 Max": (16.4e12, 40), "M3 Ultra": (32.8e12, 80),
    "M4": (4.3e12, 10), "M4 Pro": (8.5e12, 20), "M4 Max": (17.0e12, 40),
}
HALF = ("bfloat16", "float16")


# ---- FLOP counts -------------------------------------------------------------------------------

def attention_forward_flops(cfg, batch: int, seqlen: int, causal: bool = True) -> float:
    """Matmul FLOPs of one attention core forward, FlashAttention's convention: every softmax map
    costs 2 L^2 (d_qk + d_v) per sequence, halved when causal. vanilla: 4 B L^2 H d / 2;
    DIFF V1: 2H maps of d with v 2d = 6 B L^2 H d (causal), as in shared/notes/kernels.md."""
    flops = batch * cfg.q_heads * 2.0 * seqlen * seqlen * (cfg.head_dim + cfg.v_head_dim)
    return flops / 2 if causal else flops


def matmul_params(cfg) -> int:
    """N of 6N: every parameter but an untied input embedding (a lookup)."""
    return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def train_flops_per_token(cfg, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (module docstring): 6 N + 3 x one layer's attention forward per
    token, summed over layers."""
    attention = cfg.n_layers * attention_forward_flops(cfg, 1, seq_len, causal) / seq_len
    return 6.0 * matmul_params(cfg) + 3.0 * attention


# ---- peak rates --------------------------------------------------------------------------------

def nvidia_peak(device_name: str, dtype: str) -> float | None:
    for pattern, half, fp32 in NVIDIA:
        if re.search(pattern, device_name):
            return half if dtype in HALF else fp32 if dtype == "float32" else None
    return None


def apple_chip(device_name: str) -> str | None:
    """'Apple M3 Max' (MLX's device_name, or the CPU brand) -> 'M3 Max'; None if not an M chip."""
    m = re.search(r"\b(M\d+)(?: (Pro|Max|Ultra))?\b", device_name)
    return None if m is None else " ".join(p for p in m.groups() if p)


@functools.lru_cache(maxsize=None)
def apple_gpu_cores() -> int | None:
    """The GPU core count system_profiler reports (macOS), or None."""
    if platform.system() != "Darwin":
        return None
    try:
        out = subprocess.run(["system_profiler", "SPDisplaysDataType"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Total Number of Cores:\s*(\d+)", out)
    return int(m.group(1)) if m else None


def apple_peak(device_name: str) -> tuple[float, str] | None:
    chip = apple_chip(device_name)
    if chip not in APPLE:
        return None
    flops, cores = APPLE[chip]
    have = apple_gpu_cores()
    if have and have != cores:
        return flops * have / cores, f"Apple {chip} {have}-core GPU fp32 (scaled from {cores} cores)"
    return flops, f"Apple {chip} {cores}-core GPU fp32"


def _probe(framework: str, dtype: str, n: int):
    """A timed n x n matmul in the framework and dtype on its default device (CPU here):
    returns a function that runs one product and waits for it."""
    if framework == "torch":
        import torch

        a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
        return lambda: a @ b
    if framework == "mlx":
        import mlx.core as mx

        a, b = (mx.random.normal((n, n)).astype(getattr(mx, dtype)) for _ in range(2))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    return lambda: a @ b


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(framework: str = "numpy", dtype: str = "float32", n: int = 1024,
                          budget_s: float = 1.0) -> float:
    """FLOP/s of the fastest of a few n^3 matmuls (after one warm-up) in `framework` ("numpy",
    "torch" or "mlx", on its default device) and dtype; cached per process."""
    run = _probe(framework, dtype, n)
    run()
    best, start = math.inf, time.perf_counter()
    for i in range(20):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return 2.0 * n ** 3 / best


def peak_flops(device_name: str, dtype: str, framework: str = "numpy", gpu: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU: a GPU's datasheet figure by name, else the
    measured matmul rate of this framework and dtype (CPUs, unknown GPUs: stated as measured)."""
    if gpu:
        found = nvidia_peak(device_name, dtype)
        if found is not None:
            return found, f"{device_name} datasheet dense {'bf16' if dtype in HALF else dtype}"
        found = apple_peak(device_name)
        if found is not None:
            return found
    rate = measured_matmul_flops(framework, dtype)
    return rate, f"measured {framework} {dtype} 1024^3 matmul on {device_name or 'this machine'}"


def backend_peak(backend) -> tuple[float, str]:
    """peak_flops for a loaded diffattn Backend (its framework, device and dtype)."""
    info = backend.describe()
    gpu = info.get("device") in ("cuda", "gpu")
    framework = {"cuda": "torch", "mlx": "mlx"}.get(backend.name, "numpy")
    name = info.get("device_name") or ""
    if framework == "mlx" and gpu:
        import mlx.core as mx

        name = str(mx.device_info().get("device_name", ""))
    if not name:
        name = platform.processor() or platform.machine()
    return peak_flops(name, backend.dtype, framework, gpu)


def mfu(cfg, seq_len: int, tokens_per_s: float, peak: float, causal: bool = True) -> float:
    return train_flops_per_token(cfg, seq_len, causal) * tokens_per_s / peak
