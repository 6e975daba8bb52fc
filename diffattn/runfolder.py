"""A run folder: its lock, its states, its checkpoints and its metrics file.

A run folder is always in one of three states:

    empty       no checkpoints/latest.json. Nothing was trained (a run killed while writing its
                step-0 checkpoint leaves only leftovers): a fresh run may take it over as is.
    resumable   latest.json names a complete checkpoint below the run's last step.
    finished    latest.json names the checkpoint of the run's last step; --resume is a no-op.

A run writes its step-0 checkpoint before anything else, so every folder that holds a
run.json or a metrics.jsonl is resumable. A checkpoint is complete (every file written,
fsynced and renamed into place, the folder entry fsynced) before latest.json is replaced to
name it, and older checkpoints are deleted only after that, so a process killed or a disk
filled at any moment leaves latest.json naming a complete checkpoint.

While a run writes to a folder it holds an exclusive `flock` on `run.lock` there (its pid
written inside); the OS drops the lock when the process ends, however it ends.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

from diffattn import params as params_io
from diffattn.config import ConfigError, ModelConfig
from diffattn.params import ParamsError, check_params, load_tensors, param_shapes

CHECKPOINT_FORMAT = "diffattn-checkpoint/1"
KEEP_CHECKPOINTS = 2
LOCK_NAME = "run.lock"
LOCK_TRIES = 5
CHECKPOINT_FILES = ("params.safetensors", "optim.safetensors")
_STEP_DIR = re.compile(r"step_(\d{6,})")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the run (message is one line)."""


class RunFolderError(OSError):
    """The run folder could not be written or read (message is one line, naming what is kept)."""


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: 'PATH: reason' (no errno number, no traceback)."""
    if isinstance(e, RunFolderError) or not e.strerror:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{e.filename}: {e.strerror}" if e.filename else e.strerror


# ---- JSON --------------------------------------------------------------------------------

def json_safe(obj):
    """`obj` with every non-finite float replaced by None: the files stay valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    text = json.dumps(json_safe(obj), indent=1, sort_keys=True, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    params_io.atomic_write(path, write)


def append_record(path: Path, obj) -> None:
    """One JSON object as one line of metrics.jsonl (a torn last line is dropped on resume)."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(obj), allow_nan=False) + "\n")


def truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop records past the checkpoint (work lost in the interruption); fresh: empty."""
    keep = []
    if start_step > 0 and path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if rec.get("kind") == "train" and rec["step"] < start_step or \
                    rec.get("kind") in ("eval", "diag") and rec["step"] <= start_step:
                keep.append(line)
    text = "".join(line + "\n" for line in keep)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    params_io.atomic_write(path, write)


# ---- the lock and the folder's state -----------------------------------------------------

class RunLock:
    """An exclusive flock on <out>/run.lock, held until release() or the end of the process."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def _in_use(out, holder: str) -> ConfigError:
    return ConfigError(f"--out {out}: in use by another run (pid {holder}); wait for it to end or choose another folder")


def _holder(out: Path) -> str | None:
    """The pid in <out>/run.lock if a live process holds its lock, else None (writes nothing)."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None  # no lock file (or none readable): nobody to name; lock() has the last word
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def lock(out_dir) -> RunLock:
    """Take the run folder (creating it): a second run on it is refused with one line naming
    the pid that holds it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        for attempt in range(LOCK_TRIES):  # another process's _holder probe holds it for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    raise _in_use(out, _read_pid(fd)) from None
                time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(fd, path)


def prepare_out_dir(out_dir, resume: bool) -> None:
    """Refuse a folder this run may not write: in use by a live run (naming its pid), under a
    file, or holding a run (a checkpoint) unless resuming it. Writes nothing."""
    if out_dir is None:
        return
    holder = _holder(Path(out_dir))
    if holder is not None:
        raise _in_use(out_dir, holder)
    check_out_dir(out_dir, resume)


def check_out_dir(out_dir, resume: bool) -> None:
    """prepare_out_dir's checks of what the folder holds (again under the lock, when the run holds it)."""
    out = Path(out_dir)
    for p in (out, *out.parents):  # the nearest existing ancestor must be a folder
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"--out {out}: {p} exists and is not a folder")
            break
    if (out / "paired.json").exists():
        raise ConfigError(f"--out {out}: holds a paired run; choose another folder")
    if not resume and (out / "checkpoints" / "latest.json").exists():
        raise ConfigError(f"--out {out}: already holds a run; pass --resume to continue it or choose another folder")


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _complete(ckpt: Path) -> bool:
    return all((ckpt / f).is_file() for f in ("manifest.json", *CHECKPOINT_FILES))


def _step_dirs(root: Path) -> list[Path]:
    """step_XXXXXX folders by step number (names sort wrongly past step 999,999)."""
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def clear_leftovers(out_dir) -> None:
    """Remove what a killed run left behind: temporary files, checkpoint folders newer than
    latest.json (never named by it) and incomplete older ones. Call under the lock."""
    out = Path(out_dir)
    root = out / "checkpoints"
    for tmp in [*out.glob("*.tmp"), *root.glob("*.tmp"), *root.glob("step_*/*.tmp")]:
        tmp.unlink(missing_ok=True)
    latest = find_checkpoint(out) if (root / "latest.json").is_file() else None
    for p in _step_dirs(root):
        if latest is None or step_of(p) > step_of(latest) or (p != latest and not _complete(p)):
            shutil.rmtree(p)


# ---- checkpoints -------------------------------------------------------------------------

def save_checkpoint(out_dir, step: int, params: dict, opt_state: dict, manifest: dict,
                    keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write checkpoints/step_XXXXXX/ completely, then point latest.json at it, then drop all
    but the newest `keep` checkpoints."""
    root = Path(out_dir) / "checkpoints"
    name = f"step_{step:06d}"
    ckpt = root / name
    if ckpt.exists():  # a leftover of a run killed mid-write; never the one latest.json names
        if (root / "latest.json").is_file() and find_checkpoint(out_dir) == ckpt:
            raise CheckpointError(f"{ckpt}: refusing to overwrite the latest checkpoint")
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    params_io.save_tensors(ckpt / "params.safetensors", params)
    opt = {f"m.{k}": v for k, v in opt_state["m"].items()} | {f"v.{k}": v for k, v in opt_state["v"].items()}
    params_io.save_tensors(ckpt / "optim.safetensors", opt, {"step": str(int(opt_state["step"])),
                                                              "optimizer": opt_state.get("optimizer", "adamw")})
    files = {f: params_io.file_sha256(ckpt / f) for f in CHECKPOINT_FILES}
    write_json(ckpt / "manifest.json", {**manifest, "format": CHECKPOINT_FORMAT, "step": step,
                                        "optimizer_step": int(opt_state["step"]), "files": files})
    params_io.fsync_dir(root)  # the folder's entry is durable before the pointer names it
    write_json(root / "latest.json", {"step": step, "dir": name})
    prune_checkpoints(root, ckpt, keep)
    return ckpt


def prune_checkpoints(root: Path, newest: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep `newest` and the keep-1 newest complete checkpoints before it (by step number);
    delete every other step folder."""
    older = [p for p in _step_dirs(root) if step_of(p) < step_of(newest) and _complete(p)]
    kept = set(older[len(older) - (keep - 1):]) if keep > 1 else set()
    for p in _step_dirs(root):
        if p != newest and p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path) -> Path:
    """A run directory (its latest checkpoint), a checkpoints/ folder, or a step_XXXXXX folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        latest = root / "latest.json"
        if latest.is_file():
            try:
                name = json.loads(latest.read_text())["dir"]
            except OSError as e:
                raise CheckpointError(f"{latest}: cannot read ({e.strerror})") from None
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{latest}: corrupt checkpoint pointer") from None
            if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
                raise CheckpointError(f"{latest}: corrupt checkpoint pointer (dir {name!r})")
            return root / name
    if (path / "manifest.json").is_file():
        return path
    raise CheckpointError(f"{path}: no checkpoint found (expected checkpoints/latest.json or a manifest.json)")


def check_manifest_files(ckpt: Path, manifest: dict, verify: bool = True) -> None:
    """Fail closed: the manifest must list exactly the checkpoint's files with their sha256,
    every file must exist, and (verify) match its digest."""
    files = manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(CHECKPOINT_FILES) or \
            not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in files.values()):
        raise CheckpointError(f"{ckpt}/manifest.json: corrupt (its 'files' entry must give the sha256 of "
                              f"{' and '.join(CHECKPOINT_FILES)})")
    for f, digest in files.items():
        if not (ckpt / f).is_file():
            raise CheckpointError(f"{ckpt}: missing {f}")
        if verify and params_io.file_sha256(ckpt / f) != digest:
            raise CheckpointError(f"{ckpt / f}: corrupt (sha256 differs from the manifest)")


def load_checkpoint(path, verify: bool = True) -> tuple[dict, dict, dict, Path]:
    """(params, opt_state, manifest, checkpoint dir); any damage is a one-line CheckpointError."""
    ckpt = find_checkpoint(path)
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except OSError:
        raise CheckpointError(f"{ckpt}: checkpoint has no readable manifest.json") from None
    except ValueError:
        raise CheckpointError(f"{ckpt}/manifest.json: corrupt JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{ckpt}: not a {CHECKPOINT_FORMAT} checkpoint")
    check_manifest_files(ckpt, manifest, verify)
    try:
        cfg = ModelConfig(**manifest["model_config"])
        params, _ = load_tensors(ckpt / "params.safetensors")
        check_params(cfg, params, what=str(ckpt / "params.safetensors"))
        opt, meta = load_tensors(ckpt / "optim.safetensors")
        m = {k[2:]: v for k, v in opt.items() if k.startswith("m.")}
        v = {k[2:]: v for k, v in opt.items() if k.startswith("v.")}
        check_params(cfg, m, what=str(ckpt / "optim.safetensors") + " (m)")
        check_params(cfg, v, what=str(ckpt / "optim.safetensors") + " (v)")
        # canonical name order, as init_params gives: safetensors files list names sorted, and
        # a float sum over tensors (the global grad norm) depends on the order it runs in
        order = list(param_shapes(cfg))
        params = {k: params[k] for k in order}
        opt_state = {"optimizer": meta.get("optimizer", "adamw"), "step": int(meta["step"]),
                     "m": {k: m[k] for k in order}, "v": {k: v[k] for k in order}}
    except (ParamsError, ConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: unusable checkpoint ({str(e).splitlines()[0]})") from None
    return params, opt_state, manifest, ckpt
