"""Fault injection on run folders: a run is SIGKILLed at every stage of a checkpoint write and
before its first checkpoint (numpy, PyTorch on the CPU, MLX), two runs share one folder, the
disk fills up, the folder or the data is unreadable or unwritable; each time the user gets one
line (exit 2) and the last good checkpoint, and resuming reproduces the uninterrupted run bit
for bit: the same sha256 of the final params and optimizer files and the same metrics lines.

docs/harness.md ("Guarantees") maps each guarantee to the test here that shows it;
tests/mutate_guards.py checks that disabling each guard makes one of these tests fail.

Root bypasses file permissions, so the read-only and unreadable cases run their process
without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH when the tests run as root (CI does): the
kernel's permission checks then apply to it as to any user."""
import ctypes
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffattn import backend as backend_mod
from diffattn import cli, data, harness, params, runfolder
from diffattn.config import ConfigError, TrainConfig, preset
from faults_child import FILE_STAGES, KILL_STEP, fault_run

BACKENDS = ("numpy", "cuda", "mlx")
# stage -> the checkpoint that survives it (None: the folder is left empty, nothing trained)
SURVIVOR = {"step0": None, "before-first": 0, "params": 2, "optim": 2, "manifest": 2, "pointer": 2,
            "pruning": KILL_STEP, "metrics": KILL_STEP}
SMALL = ["--d-model", "32", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]
CLI_RUN = ["train", "--backend", "numpy", "--steps", "8", "--eval-every", "4", "--ckpt-every", "2", *SMALL]


def load_backend(name):
    try:
        return backend_mod.load(name, device="cpu", dtype=None if name == "numpy" else "float32")
    except backend_mod.BackendError as e:
        pytest.skip(f"backend {name} not importable here: {e}")


@pytest.fixture(scope="module")
def pydoc():
    return data.load("builtin:pydoc")


def train(name, out, pydoc, **kw):
    cfg, t, ckpt_every = fault_run()
    return harness.train(cfg, t, pydoc, load_backend(name), out, ckpt_every=ckpt_every, progress=False, **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pydoc):
    """The uninterrupted run's folder, one per backend (trained on first use)."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = tmp_path_factory.mktemp(f"straight_{name}")
            train(name, done[name], pydoc)
        return done[name]

    return get


def final_digests(out) -> dict:
    """sha256 of the latest checkpoint's params and optimizer files (checked against the files)."""
    _, _, manifest, _ = harness.load_checkpoint(out)
    return manifest["files"]


def records(out, kinds=("train", "eval")) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] in kinds]


def assert_same_run(out, reference):
    assert final_digests(out) == final_digests(reference)  # bitwise: params and AdamW state
    assert records(out) == records(reference)  # every train and eval line, once, in order
    assert not list(Path(out).rglob("*.tmp"))
    assert sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*")) == ["step_000006", "step_000008"]


def run_child(out, name, stage):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "tests/faults_child.py", str(out), name, stage], env=env,
                          capture_output=True, text=True, timeout=300)


def diffattn(argv, capsys) -> tuple[int, list[str]]:
    """The CLI in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def snapshot(folder) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != runfolder.LOCK_NAME}


# ---- SIGKILL at every stage, on every backend ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", list(SURVIVOR))
@pytest.mark.parametrize("name", BACKENDS)
def test_sigkill_at_any_stage_then_resume_matches_the_uninterrupted_run_bitwise(name, stage, tmp_path, pydoc,
                                                                                straight):
    reference = straight(name)
    out = tmp_path / "run"
    proc = run_child(out, name, stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if stage in FILE_STAGES or stage == "pointer":
        assert list(out.rglob("*.tmp"))  # the torn temporary file is there to clean up
    survivor = SURVIVOR[stage]
    if survivor is None:  # empty: refused by --resume, taken over by a fresh run
        assert not (out / "checkpoints" / "latest.json").exists() and not (out / "run.json").exists()
        with pytest.raises(harness.CheckpointError, match="no checkpoint"):
            train(name, out, pydoc, resume_from=out)
        train(name, out, pydoc)
    else:
        _, _, manifest, where = harness.load_checkpoint(out)
        assert manifest["step"] == survivor and where.name == f"step_{survivor:06d}"
        s = train(name, out, pydoc, resume_from=out)
        assert s["resumed_from"] == str(where) and s["steps"] == 8
    assert_same_run(out, reference)


def test_a_killed_run_restarts_in_its_folder_without_resume_when_nothing_was_trained(tmp_path, capsys):
    """A folder left by a run that died before its step-0 checkpoint (or by an older version,
    with run.json and metrics.jsonl but no checkpoint) holds nothing to lose: a fresh run takes it."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000000").mkdir(parents=True)
    (out / "run.json").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 9.0}\n{"kind": "tr')
    rc, err = diffattn([*CLI_RUN, "--out", out], capsys)
    assert rc == 0, err
    assert [r["step"] for r in records(out, ("train",))] == list(range(8))


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert diffattn([*CLI_RUN, "--out", out], capsys)[0] == 0
    before = snapshot(out)
    capsys.readouterr()
    rc = cli.main(["train", "--backend", "numpy", "--out", str(out), "--resume", "--no-progress", "--json"])
    std = capsys.readouterr()
    err = std.err.strip().splitlines()
    assert rc == 0 and len(err) == 1 and "finished at step 8; nothing to do" in err[0], err
    s = json.loads(std.out.splitlines()[-1])
    assert s["stopped"] == "finished" and s["steps"] == 8
    assert s["val_loss"] == records(out, ("eval",))[-1]["val_loss"]  # the final eval, as recorded
    assert snapshot(out) == before


# ---- one run per folder --------------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, pydoc):
    out = tmp_path / "run"
    train("numpy", out, pydoc, stop_after=2)
    before = snapshot(out)
    with runfolder.lock(out), runfolder.lock(tmp_path / "empty"):
        for folder, resume_from in ((out, None), (out, out), (tmp_path / "empty", None)):
            with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}\)") as e:
                train("numpy", folder, pydoc, resume_from=resume_from)
            assert "\n" not in str(e.value)
    assert snapshot(out) == before and [p.name for p in (tmp_path / "empty").iterdir()] == [runfolder.LOCK_NAME]
    train("numpy", out, pydoc, resume_from=out)  # released: the folder is free again


def checkpointed_step(out) -> int:
    try:
        return runfolder.step_of(runfolder.find_checkpoint(out))
    except runfolder.CheckpointError:  # latest.json not written yet
        return -1


@pytest.mark.slow
def test_two_processes_on_one_folder_one_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-m", "diffattn", *CLI_RUN[:3], "--steps", "1000000", "--eval-every",
                               "1000000", "--ckpt-every", "2", *SMALL, "--out", str(out)], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        # Wait for latest.json to name step 4 or later (written under the lock, after metrics). Not for
        # step_000004 itself: pruning keeps the last two, so a fast holder deletes it within milliseconds.
        deadline = time.time() + 120
        while checkpointed_step(out) < 4:
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read() if holder.poll() else "slow"
            time.sleep(0.05)
        for argv in ([*CLI_RUN, "--out", out], ["train", "--backend", "numpy", "--out", out, "--resume", "--no-progress"]):
            rc, err = diffattn(argv, capsys)
            assert rc == 2 and len(err) == 1 and f"in use by another run (pid {holder.pid})" in err[0], err
    finally:
        holder.kill()
        holder.wait()
    steps = [r["step"] for r in records(out, ("train",))]
    assert steps == list(range(len(steps)))  # one writer: every step once, in order
    latest = harness.load_checkpoint(out)[2]["step"]
    rc, err = diffattn(["train", "--backend", "numpy", "--out", out, "--resume", "--steps", latest, "--no-progress"],
                       capsys)
    assert rc == 0 and "nothing to do" in err[-1], err  # the OS released the dead holder's lock


# ---- a full disk -----------------------------------------------------------------------------

def fill_disk_at(monkeypatch, stage):
    """ENOSPC while writing `stage` of the step-4 checkpoint (half the file written first), or
    while appending step 5's metrics line."""
    real_write, real_append = params.atomic_write, runfolder.append_record

    def atomic_write(path, write):
        path = Path(path)
        hit = (path.parent.name, path.name) == ("step_000004", stage) or \
            (stage == "latest.json" and path.name == stage and (path.parent / "step_000004" / "manifest.json").exists())

        def torn(tmp):
            write(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

        real_write(path, torn if hit else write)

    def append_record(path, obj):
        if stage == "metrics.jsonl" and obj.get("kind") == "train" and obj["step"] == 5:
            with open(path, "a") as f:
                f.write(json.dumps(obj)[:20])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_append(path, obj)

    monkeypatch.setattr(params, "atomic_write", atomic_write)
    monkeypatch.setattr(runfolder, "append_record", append_record)


@pytest.mark.parametrize("stage,survivor", [("params.safetensors", 2), ("optim.safetensors", 2),
                                            ("manifest.json", 2), ("latest.json", 2), ("metrics.jsonl", 4)])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes_exactly(stage, survivor, tmp_path, capsys,
                                                                               monkeypatch):
    assert diffattn([*CLI_RUN, "--out", tmp_path / "straight"], capsys)[0] == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fill_disk_at(m, stage)
        rc, err = diffattn([*CLI_RUN, "--out", out], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and f"last good checkpoint: {out}/checkpoints/step_{survivor:06d}" \
        in err[0], err[0]
    assert harness.load_checkpoint(out)[2]["step"] == survivor  # latest.json still names it, intact
    assert not list(out.rglob("*.tmp"))
    rc, err = diffattn(["train", "--backend", "numpy", "--out", out, "--resume", "--ckpt-every", "2", "--no-progress"],
                       capsys)
    assert rc == 0, err
    assert_same_run(out, tmp_path / "straight")


# ---- unwritable and unreadable ------------------------------------------------------------------

def _without_permission_override():
    """Run the child as root without the capabilities that bypass file permissions (dropped from
    its bounding set, so exec does not give them back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged(*argv):
    """The CLI in a process that file permissions apply to (as this user, or root without DAC
    override); skips only where this machine cannot make one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    pre = _without_permission_override if os.geteuid() == 0 else None
    if pre is not None:
        try:
            subprocess.run([sys.executable, "-c", "pass"], preexec_fn=pre, check=True, capture_output=True)
        except subprocess.SubprocessError:
            pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE here (prctl refused), so file "
                        "permissions cannot be made to apply")
    return subprocess.run([sys.executable, "-m", "diffattn", *map(str, argv)], preexec_fn=pre, env=env,
                          capture_output=True, text=True, timeout=300)


def read_only(folder):
    for p in [folder, *Path(folder).rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(folder):
    for p in [folder, *Path(folder).rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_a_read_only_run_folder_is_one_line_and_nothing_changes(tmp_path, capsys):
    out = tmp_path / "run"
    assert diffattn([*CLI_RUN, "--stop-after", "4", "--out", out], capsys)[0] == 0
    before = snapshot(out)
    read_only(tmp_path)
    try:
        r = unprivileged("train", "--backend", "numpy", "--out", out, "--resume", "--no-progress")
        fresh = unprivileged(*CLI_RUN, "--out", tmp_path / "new" / "run")
    finally:
        writable(tmp_path)
    for proc, path in ((r, out / runfolder.LOCK_NAME), (fresh, tmp_path / "new")):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0] == f"diffattn train: error: {path}: Permission denied"
    assert snapshot(out) == before and not (tmp_path / "new").exists()
    rc, err = diffattn(["train", "--backend", "numpy", "--out", out, "--resume", "--no-progress"], capsys)
    assert rc == 0, err


def test_an_unreadable_file_in_a_data_folder_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("readable text " * 200)
    (corpus / "b.txt").write_text("unreadable text " * 200)
    (corpus / "b.txt").chmod(0)
    r = unprivileged(*CLI_RUN, "--data", corpus, "--out", tmp_path / "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"diffattn train: error: {corpus / 'b.txt'}: cannot read (Permission denied)"
    assert not (tmp_path / "run").exists()


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        rc, err = diffattn([*CLI_RUN, "--out", out], capsys)
        assert rc == 2 and err == [f"diffattn train: error: --out {out}: {tmp_path / 'file'} exists and is not a "
                                   "folder"]


def test_an_os_error_that_escapes_to_the_cli_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    def refuse(out_dir):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(out_dir))

    monkeypatch.setattr(runfolder, "lock", refuse)
    rc, err = diffattn([*CLI_RUN, "--out", tmp_path / "run"], capsys)
    assert rc == 2 and err == [f"diffattn train: error: {tmp_path / 'run'}: Read-only file system"]


# ---- checkpoints fail closed ---------------------------------------------------------------------

def _edit_manifest(ckpt, edit):
    m = json.loads((ckpt / "manifest.json").read_text())
    edit(m)
    (ckpt / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage", ["no files entry", "files not a dict", "a file left out", "a digest not hex",
                                    "an extra file"])
def test_a_manifest_without_a_valid_files_entry_is_corrupt(damage, tmp_path, pydoc):
    out = tmp_path / "run"
    train("numpy", out, pydoc, stop_after=2)
    ckpt = harness.find_checkpoint(out)
    edits = {"no files entry": lambda m: m.pop("files"),
             "files not a dict": lambda m: m.__setitem__("files", ["params.safetensors"]),
             "a file left out": lambda m: m["files"].pop("optim.safetensors"),
             "a digest not hex": lambda m: m["files"].__setitem__("params.safetensors", "x" * 64),
             "an extra file": lambda m: m["files"].__setitem__("../../run.json", "0" * 64)}
    _edit_manifest(ckpt, edits[damage])
    for verify in (True, False):
        with pytest.raises(harness.CheckpointError, match="manifest.json: corrupt"):
            harness.load_checkpoint(out, verify=verify)
    with pytest.raises(harness.CheckpointError, match="corrupt"):
        train("numpy", out, pydoc, resume_from=out)


def test_a_pointer_outside_the_checkpoints_folder_is_corrupt(tmp_path, pydoc):
    out = tmp_path / "run"
    train("numpy", out, pydoc, stop_after=2)
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "../../elsewhere"}))
    with pytest.raises(harness.CheckpointError, match="corrupt checkpoint pointer"):
        harness.load_checkpoint(out)


class NaNStateBackend:
    """Wraps a backend: from step `at` on, state() reports NaN parameters while the loss stays finite."""

    def __init__(self, inner, at):
        self.inner, self.at = inner, at
        self.name, self.device, self.dtype, self.kernels = inner.name, inner.device, inner.dtype, inner.kernels

    def build(self, cfg, params, optim=None):
        model = self.inner.build(cfg, params, optim=optim)
        real_step, real_state, steps = model.train_step, model.state, [0]

        def train_step(batch, lr):
            steps[0] += 1
            return real_step(batch, lr)

        def state():
            p, o = real_state()
            return ({k: np.full_like(v, np.nan) for k, v in p.items()} if steps[0] >= self.at else p), o

        model.train_step, model.state = train_step, state
        return model

    def describe(self):
        return self.inner.describe()


def test_non_finite_parameters_are_never_checkpointed(tmp_path, pydoc):
    cfg, t, _ = fault_run()
    with pytest.raises(harness.Diverged, match="parameters hold NaN/Inf after step 3.*step_000002"):
        harness.train(cfg, t, pydoc, NaNStateBackend(load_backend("numpy"), at=3), tmp_path, ckpt_every=2,
                      progress=False)
    params_, _, manifest, _ = harness.load_checkpoint(tmp_path)
    assert manifest["step"] == 2 and all(np.isfinite(v).all() for v in params_.values())
    assert not (tmp_path / "checkpoints" / "step_000004").exists()


# ---- valid JSON, finite settings -------------------------------------------------------------

class InfEvalBackend(NaNStateBackend):
    """Wraps a backend: evaluation losses read +inf (training stays finite)."""

    def build(self, cfg, params, optim=None):
        model = self.inner.build(cfg, params, optim=optim)
        model.token_losses = lambda tokens: np.full(tokens[:, 1:].shape, np.inf)
        return model


def strict_json(text):
    def refuse(name):
        raise ValueError(f"bare {name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_written_as_json_null(tmp_path, pydoc):
    cfg, t, _ = fault_run()
    harness.train(cfg, t, pydoc, InfEvalBackend(load_backend("numpy"), at=0), tmp_path, ckpt_every=2, progress=False)
    lines = [strict_json(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in lines if r["kind"] == "eval"] == [None, None]
    assert lines[-1]["kind"] == "stop" and lines[-1]["val_loss"] is None
    strict_json((harness.find_checkpoint(tmp_path) / "manifest.json").read_text())


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "nan"], ["--tokens", "inf"], ["--minutes", "inf"]])
def test_non_finite_settings_are_refused(flag, tmp_path, capsys):
    rc, err = diffattn(["train", "--backend", "numpy", *SMALL, *flag, "--out", tmp_path / "run"], capsys)
    assert rc == 2 and len(err) == 1 and flag[0].lstrip("-") in err[0], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="finite lr"):
        TrainConfig(lr=float("inf"))


# ---- smaller guarantees ------------------------------------------------------------------------

def test_pruning_orders_checkpoints_by_step_past_999999(tmp_path):
    cfg = preset("tiny", d_model=32, max_seq_len=16)
    p = params.init_params(cfg, 0)
    opt = {"step": 1, "m": p, "v": p}
    manifest = {"model_config": harness.config_dict(cfg)}
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        harness.save_checkpoint(tmp_path, step, p, opt, manifest)
    assert sorted(x.name for x in (tmp_path / "checkpoints").glob("step_*")) == ["step_1000000", "step_1000001"]
    assert harness.load_checkpoint(tmp_path)[2]["step"] == 1_000_001


def test_run_files_get_the_umask_mode_and_folders_are_fsynced(tmp_path, pydoc, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "dir")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(0o022)
    try:
        train("numpy", tmp_path, pydoc, stop_after=2)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes  # not a temporary file's 0600
    if os.path.exists("/proc/self/fd"):
        for folder in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "step_000002"):
            assert str(folder) in synced  # its renames are durable
