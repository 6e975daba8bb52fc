"""`kernels="auto"` on the MLX backend: the fused DIFF V1 kernel where it was measured faster.

MEASURED[(attention, head_dim, dtype, dialect)] = {L: composed ms / fused ms}, from
benchmarks/results/mlx_kernels_table.md (`bash benchmarks/scripts/mlx_gpu_proof.sh`, MLX's CUDA
build on an NVIDIA H100): the attention rows are forward + backward, bf16, causal, B*L = 16k
tokens; the float32 row is the whole `small` training step (compiled, batch 16 x 256), the only
float32 measurement. tests/test_kernel_choice.py reads every ratio back from that file.

What that gives (diffattn.kernel_choice.choose): bf16 is composed at every measured shape (the
fused kernel, without matrix units, runs 0.17-0.40x); float32 at head_dim 32 is fused (the
`small` step 1.24x faster, TF32 off). Metal was never measured, so an Apple GPU runs composed;
so does every other head dim, the CPU, and the variants with no fused kernel (vanilla, V2).
"""
from __future__ import annotations

from diffattn import kernel_choice

MEASURED = {
    ("diff", 64, "bfloat16", "cuda"): {512: 3.77 / 9.54, 2048: 5.38 / 27.80, 4096: 8.40 / 50.35},
    ("diff", 128, "bfloat16", "cuda"): {512: 6.24 / 15.78, 2048: 13.52 / 48.69, 4096: 25.28 / 92.75},
    ("diff", 32, "float32", "cuda"): {256: 11.81 / 9.51},
}


def auto_kernels(cfg, on_gpu: bool, dtype: str, dialect) -> str:
    """"fused" or "composed" for a model of cfg, by MEASURED."""
    if not on_gpu or cfg.attention != "diff" or cfg.diff_heads == "double":
        return "composed"
    return kernel_choice.choose(MEASURED, (cfg.attention, cfg.head_dim, dtype, dialect), cfg.max_seq_len)
