#!/usr/bin/env bash
# Conformance of the PyTorch backend on a CUDA GPU: every kernel set, float32 and bfloat16, on the
# shipped Microsoft fixture and on an unseen file (MQA/GQA, L = 37/130/77) written by
# tests/reference_modules.py.   Usage (repo root, on the GPU machine): bash benchmarks/scripts/cuda_gpu_conformance.sh
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
UNSEEN=${TMPDIR:-/tmp}/diffattn_unseen.safetensors
python -c "
import sys; sys.path.insert(0, 'tests')
import reference_modules as r
r.write_file('$UNSEEN', {
    'mqa_v1_L37': dict(kind='diff_v1', D=128, H=4, G=1, B=2, L=37, depth=2, seed=21),
    'gqa_v1_L130_d64': dict(kind='diff_v1', D=512, H=4, G=2, B=1, L=130, depth=5, seed=22),
    'gqa_v2_L77': dict(kind='diff_v2', D=256, H=4, G=2, B=2, L=77, seed=23),
    'gqa_vanilla_L45': dict(kind='vanilla', D=256, H=8, G=2, B=1, L=45, seed=24),
})"
status=0
for run in "naive float32" "composed float32" "fused float32" "fused bfloat16" "composed bfloat16"; do
  set -- $run
  echo "### --kernels $1 --dtype $2"
  python -m diffattn.conformance tests/fixtures/reference_diffattn.safetensors "$UNSEEN" \
      --backend cuda --device cuda --kernels "$1" --dtype "$2" || status=1
done
exit $status
