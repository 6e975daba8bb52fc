#!/usr/bin/env bash
# The asv suite on an offline GPU machine, saved under a stable machine name (docs/benchmarks.md).
#
# Run from the repository root there, with what travels beside the working tree:
#   .whl/                 asv, asv_runner and their dependencies as py3.12 wheels
#   .device/asv/          repo.bundle (git bundle of main) and commit (the hash the tree is at),
#                         for machines where the copy of the tree has no .git
#   MLX (optional)        MLX's CUDA build: .device/mlx-cuda.tar.xz (benchmarks/scripts/mlx_cuda_pack.py), or
#                         /root/mlxw/part_aa + the mlx wheel from a first call carrying .device/mlx-a, and
#                         .device/mlx-b now (../shared/tools/mlx-cuda-wheels.sh)
# The suite runs in parts (BENCHES, space-separated regexes), each a separate `asv run` that adds
# to the same results file, so a part cut short by DEADLINE_S loses only itself. Results land in
# benchmarks/asv_results/$MACHINE and are copied to $OUT after every part.
#
#   MACHINE=h100-sxm bash benchmarks/scripts/asv_gpu.sh
set -uo pipefail
MACHINE=${MACHINE:-h100-sxm}
BENCHES=${BENCHES:-"Throughput|Agreement|Paired Attention.time_ TrainStep.time_"}
DEADLINE_S=${DEADLINE_S:-480}   # start no new part after this many seconds
OUT=${OUT:-/tmp/asv_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ -f .device/mlx-cuda.tar.xz ]; then
    mkdir -p /tmp/mlx && tar -xJf .device/mlx-cuda.tar.xz -C /tmp/mlx \
        && ln -sfn "$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')" /tmp/mlx/nvidia
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
elif [ -f /root/mlxw/part_aa ] && [ -d .device/mlx-b ]; then
    cat /root/mlxw/part_aa .device/mlx-b/part_ab > /root/mlxw/"$(cat .device/mlx-b/name)" && rm /root/mlxw/part_aa \
        && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mlx /root/mlxw/*.whl
fi
[ -d /tmp/mlx ] && export PYTHONPATH=/tmp/mlx:$PYTHONPATH
commit=$(cat .device/asv/commit 2>/dev/null || git rev-parse HEAD)
if ! git rev-parse --verify -q "$commit^{commit}" >/dev/null 2>&1; then
    git init -q . && git fetch -q --update-head-ok .device/asv/repo.bundle main:main && git symbolic-ref HEAD refs/heads/main || exit 1
fi
export ASV_PYTHONPATH=$PWD:$PYTHONPATH  # asv drops PYTHONPATH in benchmark processes
python3 -c 'import torch, sys; print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' || exit 1
python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())' || echo "mlx: not installed (its benchmarks skip)"
python3 benchmarks/scripts/asv_machine.py "$MACHINE" >/dev/null  # with its details, not blank ones
for bench in $BENCHES; do
    if [ "$SECONDS" -gt "$DEADLINE_S" ]; then echo "deadline: part '$bench' not run" | tee -a "$OUT/asv_run.log"; continue; fi
    echo "== part '$bench' at ${SECONDS}s" | tee -a "$OUT/asv_run.log"
    python3 -m asv run --python=same --machine "$MACHINE" --set-commit-hash "$commit" --bench "$bench" \
        --durations=8 2>&1 | tee -a "$OUT/asv_run.log"
    cp benchmarks/asv_results/"$MACHINE"/*.json "$OUT"/
done
echo "done at ${SECONDS}s"; ls -la "$OUT"
