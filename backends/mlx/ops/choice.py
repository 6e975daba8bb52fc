"""`kernels="auto"` on the MLX backend: the fused DIFF V1 kernels where they were measured faster.

MEASURED[(attention, head_dim, dtype, dialect)] = {L: composed ms / fused ms}, from
benchmarks/results/mlx_kernels_table.md (`bash benchmarks/scripts/mlx_gpu_proof.sh`, MLX's CUDA
build on an NVIDIA H100), valid only for the kernels it measured: MEASURED_FOR is their
kernel.fingerprint(), and tests/test_kernel_choice.py fails when the kernels change under a
non-empty table. The committed table measured the scalar kernels the matrix-unit ones replaced,
so the table is empty: every shape, dtype, dialect and variant runs composed until measured.
"""
from __future__ import annotations

from diffattn import kernel_choice

# Ratios are of the kernels whose kernel.fingerprint() is MEASURED_FOR: the matrix-unit kernels
# that replaced the measured scalar ones have not been measured yet, so auto is composed everywhere.
MEASURED: dict = {}
MEASURED_FOR = None


def auto_kernels(cfg, on_gpu: bool, dtype: str, dialect) -> str:
    """"fused" or "composed" for a model of cfg, by MEASURED."""
    if not on_gpu or cfg.attention != "diff" or cfg.diff_heads == "double":
        return "composed"
    return kernel_choice.choose(MEASURED, (cfg.attention, cfg.head_dim, dtype, dialect), cfg.max_seq_len)
