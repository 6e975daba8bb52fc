"""`python -m diffattn.conformance`: reads any file of the fixture format, checks every case,
fails when an implementation is off, and reports bad input in one line."""
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffattn import conformance, spec

FIXTURE = "tests/fixtures/reference_diffattn.safetensors"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffattn.conformance", *map(str, args)],
                          capture_output=True, text=True)


def test_fixture_passes_with_the_numpy_backend():
    r = run_cli(FIXTURE, "--backend", "numpy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("PASS")
    for name in ("v1_gqa", "v1_mha", "v1_naive_mha", "vanilla_mha", "v2_mha"):
        assert name in r.stdout


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    ref = pytest.importorskip("reference_modules", reason="needs torch for the independent reference")
    path = tmp_path_factory.mktemp("vectors") / "unseen.safetensors"
    ref.write_file(path, {
        "mqa_v1": dict(kind="diff_v1", D=64, H=4, G=1, B=2, L=13, depth=2, seed=11),
        "gqa_v1_long": dict(kind="diff_v1", D=96, H=6, G=2, B=1, L=37, depth=7, seed=12),
        "gqa_vanilla": dict(kind="vanilla", D=48, H=6, G=3, B=2, L=11, seed=13),
        "mqa_v2": dict(kind="diff_v2", D=64, H=4, G=1, B=1, L=19, seed=14),
        "gqa_v2": dict(kind="diff_v2", D=96, H=4, G=2, B=2, L=7, seed=15),
    })
    return path


def test_independent_reference_reproduces_the_shipped_fixture():
    """The torch re-statement used for unseen files agrees with Microsoft's own vectors."""
    ref = pytest.importorskip("reference_modules", reason="needs torch")
    import torch

    for case in conformance.read_cases(FIXTURE):
        if case.kind == "diff_v1_naive":
            continue
        meta = {"num_heads": case.cfg.n_heads, "num_kv_heads": case.cfg.n_kv_heads, "head_dim": case.cfg.head_dim,
                "lambda_init": case.cfg.lambda_init(case.layer)}
        names = {"out_proj.weight": "o_proj.weight"} if case.kind == "diff_v2" else {}
        p = {names.get(k, k): torch.tensor(v, dtype=torch.float64) for k, v in case.params.items()}
        out = ref._forward(case.kind, p, torch.tensor(case.tensors["x"], dtype=torch.float64), meta)
        assert conformance.rel_err(out.numpy(), case.tensors["out"]) <= 1e-5, case.name


def test_unseen_shapes_pass(unseen):
    r = run_cli(unseen, "--backend", "numpy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "L37" in r.stdout and "G1" in r.stdout


def test_a_wrong_reference_fails(unseen, tmp_path):
    tensors = load_file(str(unseen))
    from safetensors import safe_open
    with safe_open(str(unseen), "np") as f:
        meta = f.metadata()
    tensors["mqa_v2.grad.lambda_proj.weight"] = tensors["mqa_v2.grad.lambda_proj.weight"] * 1.001
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = run_cli(bad, "--backend", "numpy")
    assert r.returncode == 1
    assert "FAIL" in r.stdout.splitlines()[-1]
    fail_lines = [l for l in r.stdout.splitlines() if l.endswith("FAIL") and "lambda_proj" in l]
    assert len(fail_lines) == 1


@pytest.mark.parametrize("what", ["missing", "corrupt", "no_cases", "bad_kind"])
def test_bad_input_is_one_line_and_exit_2(what, tmp_path):
    path = tmp_path / "f.safetensors"
    if what == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif what == "no_cases":
        save_file({"a": np.zeros(2, np.float32)}, str(path))
    elif what == "bad_kind":
        save_file({"a": np.zeros(2, np.float32)}, str(path), metadata={"c": '{"kind": "sparse"}'})
    r = run_cli(path, "--backend", "numpy")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


def test_float32_numpy_backend_is_within_float32_tolerance():
    r = run_cli(FIXTURE, "--backend", "numpy", "--dtype", "float32")
    assert r.returncode == 0, r.stdout


def test_rope_tables_of_the_file_are_the_specs():
    for case in conformance.read_cases(FIXTURE):
        cos, _ = spec.rope_tables(case.cfg.max_seq_len, case.cfg.head_dim)
        assert conformance.rel_err(cos, case.tensors["cos"]) <= 1e-6


def to_bf16(a):
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def test_low_precision_lambda_bounds_follow_the_conditioning():
    diff_cases = [c for c in conformance.read_cases(FIXTURE) if c.cfg.attention == "diff"]
    for case in diff_cases:
        assert conformance.bounds(case, "float32", 1e-5) == {}
        b = conformance.bounds(case, "bfloat16", 2e-2)
        assert set(b) == set(conformance.LAMBDA_GRADS)
        bound = b["grad.lambda_q1"]
        # the exact spec on bf16-rounded inputs (what any bf16 implementation starts from) is inside
        p = {k: to_bf16(v) if v.ndim >= 2 else v for k, v in case.params.items()}
        _, _, grads = spec.attention_vjp(case.cfg, case.layer, p, to_bf16(case.tensors["x"]), case.tensors["grad_out"])
        assert conformance.rel_err(grads["lambda_q1"], case.grads["lambda_q1"]) <= bound
        # while a wrong gradient (sign flipped, or lambda's exp factor dropped) is outside
        assert conformance.rel_err(-case.grads["lambda_q1"], case.grads["lambda_q1"]) > bound
        assert bound < 1.0
    assert all(conformance.bounds(c, "bfloat16", 2e-2) == {} for c in conformance.read_cases(FIXTURE)
               if c.cfg.attention != "diff")
