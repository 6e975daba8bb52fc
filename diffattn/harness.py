"""The training loop, one for every backend, through the Backend protocol only.

    summary = harness.train(model_cfg, train_cfg, data, backend, out_dir)

Per step: the batch is `data.train_batch(step, ...)` (a function of data_seed and step), the
learning rate is warmup + cosine (`optim.lr_at`; by elapsed time in budget mode), and
`model.train_step` does one AdamW update over `grad_accum` micro-batches. The loss handle of
step s is read after step s+1 is issued, so asynchronous backends keep one step in flight.

A run directory holds:

    run.json                       configs, seeds, backend, device, versions, git commit, data
    metrics.jsonl                  one JSON object per line: {"kind": "train" | "eval" | "stop", ...}
    tokenizer.json                 the tokenizer (a BPE is trained once and reused on resume)
    checkpoints/latest.json        {"step": s, "dir": "step_000s"}: replaced atomically, last
    checkpoints/step_XXXXXX/       params.safetensors, optim.safetensors, manifest.json

A checkpoint is complete before latest.json names it, and the previous one is deleted only
after, so a crash at any moment leaves a loadable checkpoint. Resume is exact: the state,
the step and therefore the batches and learning rate continue where they stopped.

Under a parallel backend (torchrun, mlx.launch: each backend's parallel.py) every process runs
this loop on the same global batches, its model's train_step keeping the process's rows and
returning the global loss; `model.state()` is called on every process (a sharded model gathers
collectively) and only the writer (`backend.is_writer`, rank 0) writes the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import diffattn
from diffattn import flops, optim, packing
from diffattn.config import AdamWConfig, ConfigError, ModelConfig, MuonConfig, TrainConfig
from diffattn.eval import POSITION_BINS, evaluate  # noqa: F401 (the loop's eval; harness.evaluate for callers)
from diffattn.params import (ParamsError, atomic_write, check_params, file_sha256, init_params, load_tensors,
                             param_shapes, save_tensors)

CHECKPOINT_FORMAT = "diffattn-checkpoint/1"
KEEP_CHECKPOINTS = 2


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the run (message is one line)."""


class Diverged(RuntimeError):
    """The loss or the parameters became NaN/Inf; the run stopped (message is one line)."""


# ---- configs as data ----------------------------------------------------------------------

def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from(d: dict) -> ModelConfig:
    return ModelConfig(**d)


def train_config_from(d: dict) -> TrainConfig:
    d = dict(d)
    d["optim"] = AdamWConfig(**d.get("optim", {}))
    d["muon"] = MuonConfig(**d.get("muon", {}))
    return TrainConfig(**d)


# Fields that may change on resume without breaking what the run computes.
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches")


def environment(backend) -> dict:
    """Versions, device and code commit, for manifests."""
    info = {"python": platform.python_version(), "numpy": np.__version__, "diffattn": diffattn.__version__,
            "platform": platform.platform(), "git_commit": git_commit()}
    try:
        import safetensors
        info["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    info["backend"] = backend.describe()
    return info


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


# ---- checkpoints --------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


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
    save_tensors(ckpt / "params.safetensors", params)
    opt = {f"m.{k}": v for k, v in opt_state["m"].items()} | {f"v.{k}": v for k, v in opt_state["v"].items()}
    save_tensors(ckpt / "optim.safetensors", opt, {"step": str(int(opt_state["step"])),
                                                   "optimizer": opt_state.get("optimizer", "adamw")})
    files = {f: file_sha256(ckpt / f) for f in ("params.safetensors", "optim.safetensors")}
    _write_json(ckpt / "manifest.json", {**manifest, "format": CHECKPOINT_FORMAT, "step": step,
                                         "optimizer_step": int(opt_state["step"]), "files": files})
    _write_json(root / "latest.json", {"step": step, "dir": name})
    done = sorted((p for p in root.glob("step_*") if p.is_dir() and p != ckpt), key=lambda p: p.name)
    for old in done[:max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def find_checkpoint(path) -> Path:
    """A run directory (its latest checkpoint), a checkpoints/ folder, or a step_XXXXXX folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        latest = root / "latest.json"
        if latest.is_file():
            try:
                return root / json.loads(latest.read_text())["dir"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{latest}: corrupt checkpoint pointer") from None
    if (path / "manifest.json").is_file():
        return path
    raise CheckpointError(f"{path}: no checkpoint found (expected checkpoints/latest.json or a manifest.json)")


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
    for f, digest in manifest.get("files", {}).items():
        if not (ckpt / f).is_file():
            raise CheckpointError(f"{ckpt}: missing {f}")
        if verify and file_sha256(ckpt / f) != digest:
            raise CheckpointError(f"{ckpt / f}: corrupt (sha256 differs from the manifest)")
    try:
        cfg = model_config_from(manifest["model_config"])
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


def check_resume(manifest: dict, cfg: ModelConfig, tcfg: TrainConfig, data_info: dict, where) -> None:
    """The checkpoint must come from the same model, optimizer, batches and data."""
    theirs = manifest["model_config"]
    defaults = config_dict(ModelConfig())
    for k, v in config_dict(cfg).items():
        if theirs.get(k, defaults[k]) != v:  # a field newer than the checkpoint has its default
            raise CheckpointError(f"{where}: checkpoint has model {k}={theirs.get(k)!r}, this run {k}={v!r}")
    theirs = manifest["train_config"]
    # as JSON holds them (tuples are lists); a field newer than the checkpoint: it ran the default
    ours, defaults = (json.loads(json.dumps(config_dict(c))) for c in (tcfg, TrainConfig()))
    for k, v in ours.items():
        if k not in RESUMABLE_CHANGES and theirs.get(k, defaults[k]) != v:
            raise CheckpointError(f"{where}: checkpoint has {k}={theirs.get(k)!r}, this run {k}={v!r}")
    for k in ("name", "fingerprint", "vocab_size"):
        if k in data_info and manifest["data"].get(k) != data_info[k]:
            raise CheckpointError(f"{where}: checkpoint was trained on data {k}={manifest['data'].get(k)!r}, "
                                  f"this run's is {data_info[k]!r}")


# ---- progress -----------------------------------------------------------------------------

class Progress:
    """One status line on stderr: redrawn in place on a terminal, a plain line every 10% (or
    30 s) otherwise. No dependency."""

    def __init__(self, total: int | None, budget_s: float | None, enabled: bool = True, stream=None):
        self.total, self.budget_s, self.enabled = total, budget_s, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_draw = 0.0
        self.last_frac = -1.0

    def update(self, step, loss, lr, tok_s, elapsed, force=False):
        if not self.enabled:
            return
        now = time.time()
        frac = elapsed / self.budget_s if self.budget_s else step / max(1, self.total)
        if self.tty:
            if not force and now - self.last_draw < 0.1:
                return
        elif not force and frac - self.last_frac < 0.1 and now - self.last_draw < 30:
            return
        self.last_draw, self.last_frac = now, frac
        width = 24
        filled = int(width * min(1.0, frac))
        of = f"/{self.total}" if self.total and not self.budget_s else ""
        line = (f"step {step}{of} [{'=' * filled}{' ' * (width - filled)}] loss {loss:.4f} lr {lr:.2e} "
                f"{tok_s:,.0f} tok/s {elapsed:.0f}s")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text):
        if not self.enabled:
            return
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- the loop -----------------------------------------------------------------------------

def _finite_state(params: dict) -> bool:
    return all(np.all(np.isfinite(v)) for v in params.values())


def prepare_out_dir(out_dir, resume: bool) -> None:
    """Refuse to write over an existing run unless resuming it (checked before anything is written)."""
    if out_dir is None:
        return
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if not resume and out.is_dir() and ((out / "run.json").exists() or (out / "checkpoints").exists()):
        raise ConfigError(f"--out {out}: already holds a run; pass --resume to continue it or choose another folder")


def train(cfg: ModelConfig, tcfg: TrainConfig, data, backend, out_dir=None, *,
          params: dict | None = None, resume_from=None, budget_s: float | None = None,
          stop_after: int | None = None, ckpt_every: int | None = None, progress: bool = True,
          extra_manifest: dict | None = None, log=None, diag_every: int | None = None, diag_layers: int = 3,
          diag_log: tuple[str, ...] = ()) -> dict:
    """Train `cfg` on `data` with `backend` (a loaded Backend). Returns a summary dict.

    params       initial parameters (default init_params(cfg, tcfg.seed))
    resume_from  a run dir or checkpoint to continue from (its configs must match)
    budget_s     wall-clock budget for training steps (excluding eval and checkpoints); the
                 schedule then follows elapsed / budget and tcfg.steps is only an upper bound
    stop_after   stop (with a checkpoint) after this many steps in total, schedule unchanged:
                 an interrupted run, for resume tests
    ckpt_every   steps between checkpoints (default: eval_every); a final one is always written
    diag_every   every this many steps (and at the start), diffattn.diagnostics of `diag_layers`
                 strided layers on a fixed probe batch -> {"kind": "diag"} records, and to the
                 `diag_log` sinks ("tensorboard", "wandb")
    tcfg.lambda_warmup_steps > 0 sets the backend model's lambda_mix to min(1, step / N) before
    each step (spec.py's negative-map weight; a backend model without set_lambda_mix refuses)
    """
    t_start = time.time()
    # -- validate everything before writing anything --
    data = packing.for_run(data, tcfg)
    data.check(tcfg.seq_len)
    if data.vocab_size > cfg.vocab_size:
        raise ConfigError(f"data {data.name!r} has token ids up to {data.vocab_size - 1}, beyond the model's "
                          f"vocab_size={cfg.vocab_size}")
    if tcfg.seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len={tcfg.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    prepare_out_dir(out_dir, resume_from is not None)
    data_info = data.describe()
    env = environment(backend)
    start_step, opt_state, elapsed_train, prior_tokens = 0, None, 0.0, 0
    if resume_from is not None:
        params, opt_state, manifest, ckpt = load_checkpoint(resume_from)
        check_resume(manifest, cfg, tcfg, data_info, ckpt)
        start_step = int(manifest["step"])
        elapsed_train = float(manifest.get("elapsed_train_s", 0.0))
        resumed = {"from": str(ckpt), "step": start_step, "backend": manifest.get("env", {}).get("backend")}
        if out_dir is not None and (Path(out_dir) / "checkpoints" / "latest.json").is_file() \
                and find_checkpoint(out_dir).resolve() != ckpt.resolve():
            raise CheckpointError(f"--out {out_dir}: holds a newer checkpoint than {ckpt}; resuming an older one "
                                  "there would overwrite it: choose another --out")
    else:
        params = init_params(cfg, tcfg.seed) if params is None else params
        check_params(cfg, params)
        resumed = None
    model = backend.build(cfg, params, **optim.build_options(tcfg))
    if opt_state is not None:
        model.load_state(params, opt_state)
    warmup = tcfg.lambda_warmup_steps
    if warmup and cfg.attention == "vanilla":
        raise ConfigError("lambda_warmup_steps: a vanilla model has no negative map to warm up")
    if warmup and not hasattr(model, "set_lambda_mix"):
        raise ConfigError(f"lambda_warmup_steps: backend {backend.name!r} has no lambda_mix (set_lambda_mix)")
    if diag_every is not None and diag_every <= 0:
        raise ConfigError(f"diag_every={diag_every} must be a positive integer")
    if diag_log:
        from diffattn import diagnostics

        diagnostics.check_sinks(diag_log)

    writer = getattr(backend, "is_writer", True)  # one process writes (rank 0 under --parallel)
    tokens_per_step = tcfg.grad_accum * tcfg.batch_size * tcfg.seq_len
    total = tcfg.steps
    ckpt_every = ckpt_every or tcfg.eval_every
    run_info = {"model_config": config_dict(cfg), "train_config": config_dict(tcfg),
                "seed": tcfg.seed, "data_seed": tcfg.data_seed, "data": data_info, "env": env,
                "budget_s": budget_s, "tokens_per_step": tokens_per_step, **(extra_manifest or {})}
    out = Path(out_dir) if out_dir is not None else None
    metrics_path = None
    if out is not None and writer:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "run.json", {**run_info, "resumed": resumed, "argv": sys.argv,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if getattr(data, "tokenizer", None) is not None:
            _write_json(out / "tokenizer.json", data.tokenizer.to_json())
        metrics_path = out / "metrics.jsonl"
        _truncate_metrics(metrics_path, start_step)
    probe, sinks, mix = None, None, 1.0
    if diag_every:
        from diffattn import diagnostics

        probe = diagnostics.probe_batch(data, tcfg.seq_len, tcfg.data_seed)
        diag_at = diagnostics.strided_layers(cfg.n_layers, diag_layers)
        sinks = diagnostics.Sinks(diag_log, out if out is not None else Path("."))

    def record(obj):
        if log is not None:
            log(obj)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(obj) + "\n")

    bar = Progress(total if not budget_s else None, budget_s, enabled=progress and writer)
    if "crop_fraction" in data_info:
        bar.message(f"packing {data_info['packing']}: {data_info['documents']['train']:,} training documents in "
                    f"{data_info['rows_per_epoch']:,} rows of {tcfg.seq_len + 1} tokens per epoch, "
                    f"{data_info['crop_fraction']:.1%} of their tokens cropped")
    losses: dict[int, float] = {}
    evals: list[dict] = []
    last_ckpt = resumed["from"] if resumed else None
    last_ckpt_step = start_step if resumed else None
    stopped = "steps"
    pending = None  # (step, handle, lr)
    window_t, window_tokens, timed_s, timed_tokens = time.time(), 0, 0.0, 0

    def resolve():
        nonlocal pending
        if pending is None:
            return
        s, handle, lr = pending
        pending = None
        loss = float(handle)
        if not math.isfinite(loss):
            where = f"; last good checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written"
            record({"kind": "stop", "step": s, "reason": "diverged", "loss": str(loss)})
            raise Diverged(f"loss is {loss} at step {s}: training stopped{where}")
        losses[s] = loss
        record({"kind": "train", "step": s, "loss": loss, "lr": lr,
                "tokens": prior_tokens + (s + 1) * tokens_per_step})

    def checkpoint(step_done):
        nonlocal last_ckpt, last_ckpt_step
        if out is None or last_ckpt_step == step_done:
            return
        p, o = model.state()  # on every process: a sharded model gathers its state collectively
        if not _finite_state(p):
            record({"kind": "stop", "step": step_done, "reason": "diverged", "loss": "non-finite parameters"})
            raise Diverged(f"parameters hold NaN/Inf after step {step_done - 1}: training stopped; last good "
                           f"checkpoint: {last_ckpt or 'none'}")
        if not writer:
            last_ckpt_step = step_done
            return
        manifest = {**run_info, "elapsed_train_s": elapsed_train, "tokens_seen": step_done * tokens_per_step,
                    "data_position": {"step": step_done, "note": "batches are a function of (data_seed, step)"},
                    "resumed": resumed, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        last_ckpt = str(save_checkpoint(out, step_done, p, o, manifest))
        last_ckpt_step = step_done

    def run_eval(step_done):
        set_mix(step_done)  # during a warmup, the weight the next step trains with
        ev = evaluate(model, data, tcfg)
        ev = {"kind": "eval", "step": step_done, **ev}
        evals.append(ev)
        record(ev)
        bpb = f" bpb {ev['val_bpb']:.4f}" if ev["val_bpb"] is not None else ""
        acc = f" accuracy {ev['accuracy']:.3f}" if "accuracy" in ev else ""
        bar.message(f"eval step {step_done}: val loss {ev['val_loss']:.4f}{bpb}{acc}")

    def set_mix(step_next):
        nonlocal mix
        w = min(1.0, step_next / warmup) if warmup else 1.0
        if w != mix:
            model.set_lambda_mix(w)
            mix = w

    def run_diag(step_done):
        resolve()
        w = min(1.0, step_done / warmup) if warmup else 1.0  # the weight the next step trains with
        rec = {"kind": "diag", "step": step_done, **diagnostics.diagnose(cfg, model.state()[0], probe, diag_at, w)}
        record(rec)
        sinks.write(rec)

    step = start_step
    t_loop = time.time()
    set_mix(step)
    if diag_every and resumed is None:  # a resumed run has its start's record already
        run_diag(step)
    try:
        while step < total:
            if budget_s is not None and elapsed_train >= budget_s:
                stopped = "budget"
                break
            if stop_after is not None and step >= stop_after:
                stopped = "stop_after"
                break
            batch = data.train_batch(step, tcfg.batch_size, tcfg.seq_len, tcfg.grad_accum, tcfg.data_seed)
            batch = batch[0] if tcfg.grad_accum == 1 else batch
            lr = optim.lr_at(step, tcfg, elapsed_train / budget_s if budget_s else None)
            set_mix(step)
            t0 = time.time()
            handle = model.train_step(batch, lr)
            resolve()
            pending = (step, handle, lr)
            step += 1
            dt = time.time() - t0
            elapsed_train += dt
            window_tokens += tokens_per_step
            if step - start_step > 1:  # the first step of a process pays compilation; not timed
                timed_s += dt
                timed_tokens += tokens_per_step
            if step % ckpt_every == 0 or step % tcfg.eval_every == 0:
                t1 = time.time()
                resolve()  # the step in flight belongs to training time
                elapsed_train += time.time() - t1
                timed_s += time.time() - t1
                if step % tcfg.eval_every == 0:
                    run_eval(step)
                if step % ckpt_every == 0 and step < total:
                    checkpoint(step)
            if diag_every and step % diag_every == 0:
                run_diag(step)
            if losses:
                now = time.time()
                tok_s = window_tokens / max(now - window_t, 1e-9)
                if now - window_t > 2:
                    window_t, window_tokens = now, 0
                last = max(losses)
                bar.update(step, losses[last], lr, tok_s, elapsed_train if budget_s else now - t_loop)
        resolve()
        if not evals or evals[-1]["step"] != step:
            run_eval(step)
        checkpoint(step)
    finally:
        bar.close()
    final = evals[-1]
    tokens_per_s = timed_tokens / timed_s if timed_s else None
    peak, peak_source = flops.backend_peak(backend) if tokens_per_s else (None, None)
    world = getattr(backend, "world_size", 1)  # tokens_per_s is the global batch's: every rank's device
    if peak is not None and world > 1:
        peak, peak_source = peak * world, f"{world} x {peak_source}"
    summary = {"steps": step, "tokens": step * tokens_per_step, "stopped": stopped,
               "train_loss": losses[max(losses)] if losses else None,
               "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
               "loss_by_position": final["loss_by_position"], "position_bins": final["position_bins"],
               "accuracy": final.get("accuracy"), "answer_loss": final.get("answer_loss"),
               "tokens_per_s": tokens_per_s,
               "flops_per_token": flops.train_flops_per_token(cfg, tcfg.seq_len),
               "mfu": flops.mfu(cfg, tcfg.seq_len, tokens_per_s, peak) if tokens_per_s else None,
               "mfu_peak_flops": peak, "mfu_peak_source": peak_source, "optimizer": tcfg.optimizer,
               "packing": tcfg.packing, "crop_fraction": data_info.get("crop_fraction"),
               "train_seconds": elapsed_train, "wall_seconds": time.time() - t_start,
               "backend": backend.name, "device": env["backend"].get("device"), "dtype": backend.dtype,
               "attention": cfg.attention, "params": cfg.num_params(), "data": data_info["name"],
               "out_dir": str(out) if out else None, "checkpoint": last_ckpt, "losses": losses,
               "resumed_from": resumed["from"] if resumed else None}
    record({"kind": "stop", "step": step, "reason": stopped,
            **{k: summary[k] for k in ("val_loss", "val_bpb", "accuracy", "tokens_per_s", "mfu", "mfu_peak_source",
                                       "crop_fraction", "train_seconds")}})
    return summary


def _truncate_metrics(path: Path, start_step: int) -> None:
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

    atomic_write(path, write)
