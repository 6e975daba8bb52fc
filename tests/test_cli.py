"""The `diffattn` command, run as a user runs it (a subprocess): results, resume, and every bad
input stopping with one line on stderr, exit code 2, and nothing written."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffattn import backend as backend_mod
from diffattn import data

SMALL = ["--d-model", "32", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]


def diffattn(*args, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "diffattn", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def have(name):
    try:
        backend_mod.load(name, device="cpu")
        return True
    except backend_mod.BackendError:
        return False


def snapshot(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_prints_val_bpb_and_a_json_summary(tmp_path):
    r = diffattn("train", "--backend", "numpy", "--steps", "6", "--eval-every", "3", "--out", tmp_path / "run",
                 "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("val bpb ")
    summary = json.loads(lines[-1])
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert summary["val_bpb"] == evals[-1]["val_bpb"] and summary["steps"] == 6
    assert f"val bpb {summary['val_bpb']:.4f}" in lines[0]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["preset"] == "tiny" and run["model_config"]["d_model"] == 32 and run["env"]["backend"]["backend"] == "numpy"


def test_train_on_a_cpu_prints_mfu_and_the_recipe_with_its_crop_fraction(tmp_path):
    r = diffattn("train", "--backend", "numpy", "--steps", "4", "--eval-every", "4", "--out", tmp_path / "run",
                 "--optimizer", "muon", "--packing", "bos-best-fit", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["optimizer"] == "muon" and s["packing"] == "bos-best-fit" and 0 < s["crop_fraction"] < 1
    assert 0 < s["mfu"] < 1 and s["mfu_peak_source"].startswith("measured numpy float64")
    line = r.stdout.splitlines()[0]
    assert f"MFU {s['mfu']:.2%}" in line and f"cropped {s['crop_fraction']:.1%}" in line
    stop = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert stop["kind"] == "stop" and stop["mfu"] == s["mfu"] and stop["crop_fraction"] == s["crop_fraction"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_config"]["optimizer"] == "muon" and run["data"]["crop_fraction"] == s["crop_fraction"]


def test_stop_then_resume_equals_one_straight_run(tmp_path):
    common = ["train", "--backend", "numpy", "--steps", "8", "--eval-every", "4", *SMALL]
    assert diffattn(*common, "--out", tmp_path / "a").returncode == 0
    r = diffattn(*common, "--out", tmp_path / "b", "--stop-after", "4")
    assert r.returncode == 0, r.stderr
    r = diffattn("train", "--backend", "numpy", "--out", tmp_path / "b", "--resume", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["steps"] == 8

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in x]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.skipif(not (have("mlx") and have("cuda")), reason="needs both the mlx and the cuda backends")
def test_resume_from_a_checkpoint_of_the_other_backend(tmp_path):
    r = diffattn("train", "--backend", "mlx", "--steps", "8", "--eval-every", "4", "--stop-after", "4",
                 "--out", tmp_path / "m", *SMALL)
    assert r.returncode == 0, r.stderr
    r = diffattn("train", "--backend", "cuda", "--resume-from", tmp_path / "m", "--out", tmp_path / "c",
                 "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["backend"] == "cuda" and s["steps"] == 8 and s["resumed_from"].endswith("step_000004")


def test_paired_prints_deltas_and_records_byte_identical_init(tmp_path):
    r = diffattn("paired", "--backend", "numpy", "--steps", "3", "--out", tmp_path / "p", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and "loss @ pos" in r.stdout
    s = json.loads(r.stdout.splitlines()[-1])
    shared = json.loads((tmp_path / "p" / "seed_0" / "shared.json").read_text())
    assert shared["byte_identical_at_init"] and shared["count"] == s["per_seed"][0]["shared"]["count"] > 10
    one = s["per_seed"][0]
    assert one["delta"]["val_loss"] == pytest.approx(one["diff"]["val_loss"] - one["vanilla"]["val_loss"], abs=1e-12)
    assert s["summary"]["val_loss"]["mean"] == one["delta"]["val_loss"] and s["summary"]["val_loss"]["t_interval"] is None


@pytest.mark.slow
@pytest.mark.skipif(not have("cuda"), reason="needs the cuda backend (PyTorch, here on the CPU)")
def test_multi_seed_paired_then_eval_reproduces_a_twins_last_val_loss(tmp_path):
    out = tmp_path / "p"
    r = diffattn("paired", "--backend", "cuda", "--preset", "tiny", "--seeds", "0-2", "--steps", "4",
                 "--eval-every", "2", "--out", out, "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    p = json.loads((out / "paired.json").read_text())
    assert p["complete"] and [s["seed"] for s in p["per_seed"]] == [0, 1, 2]
    deltas = [s["delta"]["val_loss"] for s in p["per_seed"]]
    v = p["summary"]["val_loss"]
    assert v["mean"] == pytest.approx(np.mean(deltas), abs=1e-15) and v["n"] == 3
    assert v["t_interval"][0] < v["mean"] < v["t_interval"][1] and len(p["summary"]["loss_by_position"]) == 8
    assert "95% t [" in r.stdout
    twin = out / "seed_1" / "vanilla"
    last = [json.loads(x) for x in (twin / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    r = diffattn("eval", twin, "--backend", "cuda", "--json")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout.splitlines()[-1])
    # the same float32 computation on the same eval tokens; 1e-6 nats is float32 rounding of a ~3-nat mean
    assert e["step"] == last["step"] == 4 and e["tokens"] == 2 * 16
    assert e["val_loss"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert e["loss_by_position"] == pytest.approx(last["loss_by_position"], abs=1e-6)
    # another backend evaluates the same checkpoint (numpy, float64): the same loss to float32's precision
    r = diffattn("eval", twin / "checkpoints", "--backend", "numpy", "--position-bins", "4", "--json")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout.splitlines()[-1])
    assert e["val_loss"] == pytest.approx(last["val_loss"], abs=1e-5) and len(e["loss_by_position"]) == 4


def test_eval_rejects_a_task_it_lacks(tmp_path):
    r = diffattn("train", "--backend", "numpy", "--steps", "2", "--eval-every", "2", "--out", tmp_path / "r", *SMALL)
    assert r.returncode == 0, r.stderr
    r = diffattn("eval", tmp_path / "r", "--backend", "numpy", "--task", "no-such-task")
    assert r.returncode == 2 and "--task 'no-such-task'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not (have("mlx") and have("cuda")), reason="needs both the mlx and the cuda backends")
def test_agree_tiny_50_steps_within_tolerance():
    r = diffattn("agree", "--preset", "tiny", "--steps", "50", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["ok"] and s["steps"] == 50
    assert s["logits_rel_err"] <= 1e-5 and s["max_abs_loss_diff"] <= 1e-4


def test_conformance_is_delegated():
    r = diffattn("conformance", "tests/fixtures/reference_diffattn.safetensors", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert "backend=numpy" in r.stdout


def test_report_is_delegated_or_a_clear_error():
    import importlib.util

    r = diffattn("report", "--help")
    if importlib.util.find_spec("diffattn.report") is None:
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "diffattn.report" in r.stderr
    else:
        assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr


# ---- bad input: one line, exit 2, nothing written -------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One folder for every bad-input case: each case asserts it writes nothing into it."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    (tmp_path / "short.txt").write_bytes(b"too short")
    data.write_shard(tmp_path / "big_ids.bin", np.array([1, 2, 300] * 200), vocab_size=256)
    # a real run whose checkpoint is then damaged or mismatched
    good = tmp_path / "good"
    r = diffattn("train", "--backend", "numpy", "--steps", "2", "--eval-every", "2", "--out", good, *SMALL)
    assert r.returncode == 0, r.stderr
    corrupt = tmp_path / "corrupt"
    r = diffattn("train", "--backend", "numpy", "--steps", "2", "--eval-every", "2", "--out", corrupt, *SMALL)
    assert r.returncode == 0, r.stderr
    f = corrupt / "checkpoints" / "step_000002" / "params.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:100] + bytes([raw[100] ^ 0xff]) + raw[101:])
    fake_torch = tmp_path / "no_torch"
    (fake_torch / "torch").mkdir(parents=True)
    (fake_torch / "torch" / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    return tmp_path


BAD = {
    "missing data path": (["--data", "{tmp}/nope.txt"], "no such file"),
    "corpus shorter than one sequence": (["--data", "{tmp}/short.txt"], "fewer than one sequence"),
    "token ids beyond the vocab": (["--data", "{tmp}/big_ids.bin"], "beyond the vocabulary"),
    "vocab smaller than the data": (["--vocab-size", "100"], "beyond vocab_size"),
    "unknown preset": (["--preset", "huge"], "unknown preset"),
    "invalid head layout": (["--n-heads", "3"], "not divisible"),
    "unknown attention": (["--attention", "linear"], "attention"),
    "unknown tokenizer": (["--tokenizer", "wordpiece"], "unknown tokenizer"),
    "corrupt checkpoint": (["--resume-from", "{tmp}/corrupt"], "corrupt"),
    "mismatched checkpoint": (["--resume-from", "{tmp}/good", "--d-model", "64"], "differs from the checkpoint"),
    "resume without a run": (["--resume"], "no checkpoint"),
    "unknown backend": (["--backend", "tpu"], "unknown backend"),
    "backend not installed": (["--backend", "cuda"], "not installed"),
    "negative steps": (["--steps", "-3"], "positive"),
    "cuda-only option elsewhere": (["--cuda-graphs"], "no graphs option"),
    "CUDA graphs on a CPU": (["--backend", "cuda", "--device", "cpu", "--cuda-graphs"], "need device='cuda'"),
    "bad flag": (["--stepz", "3"], "unrecognized"),
    "unknown optimizer": (["--optimizer", "sgd"], "invalid choice"),
    "resume with the other optimizer": (["--resume-from", "{tmp}/good", "--optimizer", "muon"],
                                        "optimizer='adamw', this run optimizer='muon'"),
    "packing data without documents": (["--data", "builtin:recall", "--packing", "bos-best-fit"], "has none here"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs):
    tmp = bad_inputs
    extra, expect = BAD[case]
    extra = [a.replace("{tmp}", str(tmp)) for a in extra]
    args = ["train"] + (["--backend", "numpy"] if "--backend" not in extra else []) + extra
    out = tmp / "good" if case in ("resume without a run",) else tmp / "out"
    if case == "resume without a run":
        out = tmp / "fresh"
    args += ["--out", out, "--steps", "2"] if "--steps" not in extra else ["--out", out]
    args += ["--no-progress"]
    env = {"PYTHONPATH": str(tmp / "no_torch")} if case == "backend not installed" else None
    before = snapshot(tmp)
    r = diffattn(*args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expect in lines[0], lines[0]
    assert r.stdout == ""
    assert snapshot(tmp) == before  # nothing written, nothing overwritten


def test_an_existing_run_is_refused_without_resume(bad_inputs):
    good = bad_inputs / "good"
    before = snapshot(good)
    r = diffattn("train", "--backend", "numpy", "--steps", "2", "--out", good, *SMALL)
    assert r.returncode == 2 and "already holds a run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert snapshot(good) == before


def test_tokens_and_minutes_set_the_length_of_a_run(tmp_path):
    r = diffattn("train", "--backend", "numpy", "--tokens", "100", "--out", tmp_path / "t", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["steps"] == 4 and s["stopped"] == "steps"  # ceil(100 / (2 x 16)) steps
    r = diffattn("train", "--backend", "numpy", "--minutes", "0.01", "--out", tmp_path / "m", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["stopped"] == "budget" and s["train_seconds"] >= 0.6


def test_tokenize_writes_shards_that_train_with_exact_bpb(tmp_path):
    r = diffattn("tokenize", "--data", "builtin:pydoc", "--tokenizer", "bpe:300", "--out", tmp_path / "shards")
    assert r.returncode == 0, r.stderr
    d = data.load(str(tmp_path / "shards"))
    direct = data.load("builtin:pydoc", "bpe:300")
    assert d.vocab_size == 300 and np.array_equal(d.train[0], direct.train[0]) and np.array_equal(d.val[0], direct.val[0])
    assert int(d.token_bytes[np.concatenate(d.train + d.val)].sum()) == len(data.pydoc_text())
    r = diffattn("train", "--backend", "numpy", "--data", tmp_path / "shards", "--steps", "2", "--out", tmp_path / "run",
                 "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["val_bpb"] is not None
    r = diffattn("tokenize", "--data", "builtin:pydoc", "--out", tmp_path / "shards")
    assert r.returncode == 2 and "already holds token shards" in r.stderr


@pytest.mark.skipif(not have("cuda"), reason="PyTorch not installed")
def test_torch_names_the_pytorch_backend_and_its_device_and_the_run_ends_with_its_loss_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    r = diffattn("train", "--backend", "torch", "--device", "cpu", "--steps", "3", "--eval-every", "3", "--out", out,
                 *[a for a in SMALL if a != "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert "with torch (cpu, float32) ->" in r.stderr and "cuda (cpu" not in r.stderr
    assert r.stdout.splitlines()[-1] == f"loss plot: {out / 'loss.png'}"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["env"]["backend"]["backend"] == "cuda"  # the registry name: checkpoints resume under either name
    assert run["env"]["backend"]["kernels_used"] == "composed"  # what "auto" resolved to: composed off a GPU


def test_paired_run_ends_with_both_arms_loss_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "paired"
    r = diffattn("paired", "--backend", "numpy", "--steps", "2", "--eval-every", "2", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"loss plot: {out / 'loss.png'}"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
