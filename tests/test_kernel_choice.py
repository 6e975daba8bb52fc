"""kernels="auto" picks the fused kernel only where a committed measurement shows it faster.

The ratio tables in each backend's ops/choice.py are read back from the result files they cite, so
a table that drifts from its measurement fails here; the rule is checked on the presets."""
import json
from pathlib import Path

import pytest

from backends.cuda.ops import choice as cuda_choice
from diffattn import kernel_choice
from diffattn.config import preset

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
CUDA_TABLES = {64: "h200_kernels_table_d0260be_d64_subln.json", 128: "h200_kernels_table_20cfd86_d128_subln.json"}
VARIANT = {"diff": "diff_v1", "diff_v2": "diff_v2"}
COMPOSED = {True: "composed:cudnn+compile", False: "composed:cudnn"}


@pytest.mark.parametrize("key", sorted(cuda_choice.MEASURED, key=repr))
def test_cuda_table_is_the_committed_kernel_table(key):
    attention, d, compiled = key
    rows = json.loads((RESULTS / CUDA_TABLES[d]).read_text())["rows"]
    ms = {(r["impl"], r["L"]): r["ms"] for r in rows if r.get("ms")
          and r["variant"] == VARIANT[attention] and r["d"] == d and r["mode"] == "fwd+bwd"}
    measured = {L: ms[(COMPOSED[compiled], L)] / ms[("fused", L)] for (impl, L) in ms if impl == "fused"}
    assert measured.keys() == cuda_choice.MEASURED[key].keys()
    for L, ratio in measured.items():  # the table keeps 3 decimals
        assert cuda_choice.MEASURED[key][L] == pytest.approx(ratio, abs=5e-4), (key, L)


def test_mlx_table_measured_the_kernels_in_the_tree():
    mlx_choice = pytest.importorskip("backends.mlx.ops.choice")  # its package imports mlx
    from backends.mlx.ops.diff_v1 import kernel

    # a table is valid for the kernels it measured; the matrix-unit kernels are not measured yet
    assert not mlx_choice.MEASURED or mlx_choice.MEASURED_FOR == kernel.fingerprint()


def test_unmeasured_or_slower_is_composed_faster_is_fused():
    table = {("x", 64): {1024: 0.9, 4096: 1.1}}
    assert kernel_choice.choose(table, ("y", 64), 1024) == "composed"  # never measured
    assert kernel_choice.choose(table, ("x", 64), 1024) == "composed"  # measured slower
    assert kernel_choice.choose(table, ("x", 64), 8192) == "fused"  # nearest measured: 4096
    assert kernel_choice.choose(table, ("x", 64), 2047) == "composed"  # log-nearer 1024
    assert kernel_choice.choose(table, ("x", 64), 2049) == "fused"


def cuda(cfg, compiled=True, dtype="bfloat16", cap=(9, 0)):
    return cuda_choice.auto_kernels(cfg, "cuda", dtype, compiled, cap)


def test_cuda_auto_on_the_presets():
    assert cuda(preset("stage1", attention="diff")) == "fused"  # V1 d64: 1.14-1.22x compiled
    assert cuda(preset("stage1", attention="diff_v2", max_seq_len=1024)) == "composed"  # 0.85x at 1k
    assert cuda(preset("stage1", attention="diff_v2", max_seq_len=4096)) == "fused"
    assert cuda(preset("stage1", attention="diff_v2", max_seq_len=1024), compiled=False) == "fused"
    assert cuda(preset("stage1", attention="vanilla")) == "composed"
    d128 = preset("stage1", attention="diff", n_heads=preset("stage1").d_model // 256)
    assert d128.head_dim == 128 and cuda(d128) == "composed"  # fused 0.70-0.75x compiled
    assert cuda(preset("stage1", attention="diff"), dtype="float32") == "composed"  # never timed
    assert cuda(preset("stage1", attention="diff"), cap=(8, 0)) == "composed"  # not sm_90
    assert cuda_choice.auto_kernels(preset("stage1", attention="diff"), "cpu", "bfloat16", True, None) == "composed"
    assert cuda(preset("small", attention="diff")) == "composed"  # head_dim 32: unmeasured


def test_mlx_auto_on_the_presets():
    mlx_choice = pytest.importorskip("backends.mlx.ops.choice")
    assert mlx_choice.auto_kernels(preset("stage1", attention="diff"), True, "bfloat16", "cuda") == "composed"
    assert mlx_choice.auto_kernels(preset("small", attention="diff"), True, "float32", "cuda") == "composed"  # not measured since the kernels changed
    assert mlx_choice.auto_kernels(preset("small", attention="diff"), True, "float32", "metal") == "composed"
    assert mlx_choice.auto_kernels(preset("small", attention="diff"), False, "float32", None) == "composed"
    assert mlx_choice.auto_kernels(preset("small", attention="vanilla"), True, "float32", "cuda") == "composed"


def test_cuda_backend_resolves_auto_per_model_on_the_cpu():
    from diffattn.backend import load

    b = load("cuda", device="cpu", kernels="auto")
    assert b.kernels_for(preset("tiny", attention="diff")) == "composed"
