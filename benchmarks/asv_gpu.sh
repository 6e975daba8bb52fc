#!/usr/bin/env bash
# The asv suite on an offline GPU machine, saved under a stable machine name (docs/benchmarks.md).
#
# Run from the repository root there, with what travels beside the working tree:
#   .whl/                 asv, asv_runner and their dependencies as py3.12 wheels
#   .device/asv/          repo.bundle (git bundle of main) and commit (the hash the tree is at),
#                         for machines where the copy of the tree has no .git
#   /tmp/mlx (optional)   MLX's CUDA build installed by ../shared/tools/mlx-cuda-wheels.sh's steps
# Results land in benchmarks/asv_results/$MACHINE and are copied to $OUT (if set).
#
#   MACHINE=h100-sxm BENCH='^(?!.*peakmem_)' bash benchmarks/asv_gpu.sh
set -uo pipefail
MACHINE=${MACHINE:-h100-sxm}
BENCH=${BENCH:-.}
OUT=${OUT:-/tmp/asv_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/mlx ] && export PYTHONPATH=/tmp/mlx:$PYTHONPATH
commit=$(cat .device/asv/commit 2>/dev/null || git rev-parse HEAD)
if ! git rev-parse --verify -q "$commit^{commit}" >/dev/null 2>&1; then
    git init -q . && git fetch -q .device/asv/repo.bundle main:main && git symbolic-ref HEAD refs/heads/main || exit 1
fi
export ASV_PYTHONPATH=$PWD:$PYTHONPATH  # asv drops PYTHONPATH in benchmark processes
python3 -c 'import torch, sys; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' || exit 1
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())' || echo "mlx: not installed (its benchmarks skip)"
python3 -m asv machine --machine "$MACHINE" --yes >/dev/null
python3 -m asv run --python=same --machine "$MACHINE" --set-commit-hash "$commit" --bench "$BENCH" \
    --durations=15 2>&1 | tee "$OUT/asv_run_$MACHINE.log"
cp benchmarks/asv_results/"$MACHINE"/*.json "$OUT"/
ls -la "$OUT"
