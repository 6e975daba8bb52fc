"""`kernels="auto"` on the PyTorch backend: the fused Triton kernels where they were measured faster.

MEASURED[(attention, head_dim, compiled)] = {L: composed ms / fused ms} of one training step's
attention (forward + backward, bf16, causal, 16 heads, B*L = 16k tokens) on an NVIDIA H200 (sm_90),
with subln for DIFF V1. `compiled` says which composed path the fused op replaced: torch.compile'd
(CudaOptions.compile) or eager; the fused op is the same either way. Source: the "x best composed"
rows of benchmarks/results/h200_kernels_table_d0260be_d64_subln.json (head_dim 64) and
h200_kernels_table_20cfd86_d128_subln.json (head_dim 128), made by
`python benchmarks/scripts/kernels_table.py --dims 64|128 --subln`; tests/test_kernel_choice.py
recomputes every ratio from those files.

What that gives (diffattn.kernel_choice.choose): DIFF V1 at head_dim 64 is fused, compiled or not;
DIFF V2 at head_dim 64 is fused eager, and compiled from L 2k (0.85x at 1k); head_dim 128 is
composed compiled, and eager only where L is near 1k. Everything unmeasured is composed: float32
(never timed fused on a GPU), other head dims, GPUs other than sm_90, vanilla (its op is SDPA
either way; "fused" adds only the Triton head split, never timed alone) and the CPU.
"""
from __future__ import annotations

from diffattn import kernel_choice

MEASURED = {
    ("diff", 64, True): {1024: 1.216, 2048: 1.201, 4096: 1.216, 8192: 1.191, 16384: 1.140},
    ("diff", 64, False): {1024: 2.175, 2048: 1.780, 4096: 1.532, 8192: 1.338, 16384: 1.243},
    ("diff_v2", 64, True): {1024: 0.851, 2048: 1.030, 4096: 1.055, 8192: 1.024, 16384: 1.031},
    ("diff_v2", 64, False): {1024: 1.164, 2048: 1.278, 4096: 1.169, 8192: 1.092, 16384: 1.078},
    ("diff", 128, True): {1024: 0.699, 2048: 0.723, 4096: 0.736, 8192: 0.724, 16384: 0.754},
    ("diff", 128, False): {1024: 1.137, 2048: 0.971, 4096: 0.864, 8192: 0.791, 16384: 0.794},
    ("diff_v2", 128, True): {1024: 0.860, 2048: 0.814, 4096: 0.807, 8192: 0.776, 16384: 0.709},
    ("diff_v2", 128, False): {1024: 1.186, 2048: 1.000, 4096: 0.889, 8192: 0.822, 16384: 0.726},
}
MEASURED_ON = (9, 0)  # the compute capability the table was measured on


def auto_kernels(cfg, device_type: str, dtype: str, compiled: bool, capability=None, triton: bool = True) -> str:
    """"fused" or "composed" for a model of cfg on this device, by MEASURED."""
    if device_type != "cuda" or dtype != "bfloat16" or not triton or tuple(capability or ()) != MEASURED_ON:
        return "composed"
    if cfg.attention == "diff" and cfg.diff_heads == "double":
        return "composed"  # the fused kernels implement the split (paper) layout only
    return kernel_choice.choose(MEASURED, (cfg.attention, cfg.head_dim, bool(compiled)), cfg.max_seq_len)
