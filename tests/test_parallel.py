"""Training over several processes on the frameworks' own engines equals training in one.

Two processes (torchrun with gloo for DDP and FSDP2; mlx.launch with MLX's ring backend) take
their halves of the global batch one process draws; their per-step losses must match the one
process's within 1e-5 relative over 20 float32 steps (the gradient of the global mean is
summed in another order, ~1e-7 relative; 20 AdamW updates keep it well under 1e-5). Checkpoints
written by two processes resume on one, and one process's on two, continuing the same losses.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffattn import cli
from diffattn.backend import BackendError, rank_rows

RTOL = 1e-5
STEPS = 20
RUN = ["train", "--preset", "tiny", "--device", "cpu", "--steps", str(STEPS), "--ckpt-every", "10",
       "--batch-size", "8", "--seq-len", "32", "--eval-batches", "2", "--no-progress"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), e.get("PYTHONPATH")]))
    return e


def launch(launcher: list, *args, timeout=240):
    r = subprocess.run([*launcher, sys.executable, "-m", "diffattn.cli", *map(str, args)], capture_output=True,
                       text=True, env=env(), timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def torchrun(n: int):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "--no-python"]


def mlx_launch(n: int):
    exe = shutil.which("mlx.launch")
    if exe is None:
        pytest.skip("mlx.launch is not installed (pip install 'diffattn[mlx]')")
    with socket.socket() as s:  # the ring listens on port, port + 1, ...
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [exe, "-n", str(n), "--backend", "ring", "-p", str(port), "--"]


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "metrics written by more than one process"
    return {r["step"]: r["loss"] for r in train}


def assert_same_losses(got: dict, want: dict, steps):
    assert sorted(got) == list(steps)
    for s in steps:
        assert abs(got[s] - want[s]) <= RTOL * abs(want[s]), (s, got[s], want[s])


def in_this_process(*args):
    """`diffattn train` in one process, this one; torch on one thread, as torchrun's ranks run
    (OMP_NUM_THREADS=1): two threads on a busy 2-core box crawl."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    try:
        assert cli.main([*RUN, *map(str, args)]) == 0
    finally:
        if torch:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_one(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("one-torch") / "run"
    in_this_process("--backend", "cuda", "--out", out)
    return out


@pytest.fixture(scope="module")
def mlx_one(tmp_path_factory):
    pytest.importorskip("mlx.core")
    out = tmp_path_factory.mktemp("one-mlx") / "run"
    in_this_process("--backend", "mlx", "--out", out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torch_two_processes_match_one(mode, torch_one, tmp_path):
    out = tmp_path / "run"
    r = launch(torchrun(2), *RUN, "--backend", "cuda", "--parallel", mode, "--out", out)
    assert r.stdout.count("val bpb") == 1  # rank 0 reports
    assert_same_losses(losses(out), losses(torch_one), range(STEPS))
    run = json.loads((out / "run.json").read_text())
    assert run["env"]["backend"]["parallel"] == mode and run["env"]["backend"]["world_size"] == 2
    if mode == "fsdp":  # two processes' checkpoint resumes on one: the same losses from step 10 on
        again = tmp_path / "again"
        in_this_process("--backend", "cuda", "--resume-from", out / "checkpoints" / "step_000010", "--out", again)
        assert_same_losses(losses(again), losses(torch_one), range(10, STEPS))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two(torch_one, tmp_path):
    out = tmp_path / "run"
    launch(torchrun(2), *RUN, "--backend", "cuda", "--parallel", "ddp", "--out", out,
           "--resume-from", torch_one / "checkpoints" / "step_000010")
    assert_same_losses(losses(out), losses(torch_one), range(10, STEPS))


@pytest.mark.slow
def test_mlx_two_processes_match_one_and_resume_on_one(mlx_one, tmp_path):
    out = tmp_path / "run"
    r = launch(mlx_launch(2), *RUN, "--backend", "mlx", "--out", out)
    assert r.stdout.count("val bpb") == 1
    assert_same_losses(losses(out), losses(mlx_one), range(STEPS))
    run = json.loads((out / "run.json").read_text())
    assert run["env"]["backend"]["parallel"] == "ddp" and run["env"]["backend"]["world_size"] == 2
    again = tmp_path / "again"
    in_this_process("--backend", "mlx", "--resume-from", out / "checkpoints" / "step_000010", "--out", again)
    assert_same_losses(losses(again), losses(mlx_one), range(10, STEPS))


# ---- the split and the errors, in this process --------------------------------------------

def test_rank_rows_split_the_global_batch_in_order():
    batch = np.arange(3 * 8 * 5).reshape(3, 8, 5)  # (n_micro, B, L+1)
    parts = [rank_rows(batch, r, 4) for r in range(4)]
    assert all(p.shape == (3, 2, 5) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), batch)
    with pytest.raises(BackendError, match="multiple of 3"):
        rank_rows(batch, 0, 3)


@pytest.mark.parametrize("args, message", [
    (["--backend", "numpy", "--parallel", "ddp"], "runs in one process"),
    (["--backend", "mlx", "--parallel", "fsdp"], "no fsdp"),
    (["--backend", "cuda", "--parallel", "ddp", "--cuda-graphs"], "collectives"),
])
def test_bad_parallel_options_stop_with_one_line(args, message, tmp_path, capsys):
    if "mlx" in args:
        pytest.importorskip("mlx.core")
    if "cuda" in args:
        pytest.importorskip("torch")
    assert cli.main([*RUN, *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_launched_world_without_parallel_is_refused(monkeypatch):
    pytest.importorskip("torch")
    from backends.cuda import parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parallel.resolve(None) == "ddp"
    with pytest.raises(BackendError, match="every rank would train and write alone"):
        parallel.resolve("none")


# ---- Muon over several processes -------------------------------------------------------------

MUON_STEPS = 10


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_muon_over_two_processes_matches_one(backend, tmp_path):
    """Muon orthogonalises the gradient averaged over the ranks (DDP's all-reduce, MLX's all_sum
    inside the compiled step), so two processes take one process's updates: the losses agree to
    RTOL. Ranks orthogonalising their own half-batch gradients (no reduce before the update)
    moved them by ~4e-3 relative."""
    pytest.importorskip("torch" if backend == "cuda" else "mlx.core")
    muon = ["--backend", backend, "--optimizer", "muon", "--steps", MUON_STEPS]
    one = tmp_path / "one"
    in_this_process(*muon, "--out", one)
    launcher = torchrun(2) if backend == "cuda" else mlx_launch(2)
    two = tmp_path / "two"
    launch(launcher, *RUN, *muon, *(["--parallel", "ddp"] if backend == "cuda" else []), "--out", two)
    assert json.loads((two / "run.json").read_text())["train_config"]["optimizer"] == "muon"
    assert_same_losses(losses(two), losses(one), range(MUON_STEPS))


@pytest.mark.slow
def test_fsdp_refuses_muon(tmp_path):
    pytest.importorskip("torch")
    r = subprocess.run([*torchrun(1), sys.executable, "-m", "diffattn.cli", *RUN, "--backend", "cuda",
                        "--parallel", "fsdp", "--optimizer", "muon", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env(), timeout=240)
    assert r.returncode != 0 and "Newton-Schulz orthogonalises whole ones" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "run.json").exists()
