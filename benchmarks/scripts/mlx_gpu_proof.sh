#!/usr/bin/env bash
# The MLX backend's proof on an NVIDIA GPU through MLX's CUDA build (installed beforehand, see
# docs/mlx.md): kernel tests, conformance of --kernels fused in float32 and bfloat16 on unseen
# files (MQA / GQA, lengths that are not multiples of the kernels' tiles, generated with the torch
# re-statement of Microsoft's modules), then the timing table.
# Run from the repository root:  OUT=results_dir bash benchmarks/scripts/mlx_gpu_proof.sh
set -u
out=${OUT:-.}
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1
export MLX_ENABLE_TF32=0   # float32 GEMMs in float32 (the backend sets this too, if unset)
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device(), "cuda:", mx.cuda.is_available())'
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_mlx_kernels.py -rs 2>&1 | tail -25 | tee "$out/mlx_kernel_tests.txt"
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
import reference_modules as r
r.write_file("/tmp/mlx_unseen_long.safetensors", {
    "v1_mqa_L77_d32": dict(kind="diff_v1", D=128, H=2, G=1, B=2, L=77, depth=1, seed=21),
    "v1_gqa_L130_d64": dict(kind="diff_v1", D=512, H=4, G=2, B=1, L=130, depth=4, seed=22),
})
r.write_file("/tmp/mlx_unseen_d128.safetensors", {
    "v1_mha_L45_d128": dict(kind="diff_v1", D=512, H=2, G=2, B=1, L=45, depth=2, seed=23),
})
PY
# the fused kernels take head_dim in multiples of their tile (16 on CUDA: the shipped fixture's d8
# case is refused) and, in float32, up to 64 (the backward's tiles); bf16 takes d128 too
python3 -m diffattn.conformance /tmp/mlx_unseen_long.safetensors \
  --backend mlx --device gpu --kernels fused --dtype float32 2>&1 | tee "$out/mlx_conformance_fused_float32.txt"
python3 -m diffattn.conformance /tmp/mlx_unseen_long.safetensors /tmp/mlx_unseen_d128.safetensors \
  --backend mlx --device gpu --kernels fused --dtype bfloat16 2>&1 | tee "$out/mlx_conformance_fused_bfloat16.txt"
python3 benchmarks/scripts/mlx_kernels_table.py --out "$out"
