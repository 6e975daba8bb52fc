"""The training loop, one for every backend, through the Backend protocol only.

    summary = harness.train(model_cfg, train_cfg, data, backend, out_dir)

Per step: the batch is `data.train_batch(step, ...)` (a function of data_seed and step), the
learning rate is warmup + cosine (`optim.lr_at`; by elapsed time in budget mode), and
`model.train_step` does one AdamW update over `grad_accum` micro-batches. The loss handle of
step s is read after step s+1 is issued, so asynchronous backends keep one step in flight.

A run directory holds:

    run.lock                       the flock a run holds on its folder, and its pid
    run.json                       configs, seeds, backend, device, versions, git commit, data
    metrics.jsonl                  one JSON object per line: {"kind": "train" | "eval" | "stop", ...}
    tokenizer.json                 the tokenizer (a BPE is trained once and reused on resume)
    checkpoints/latest.json        {"step": s, "dir": "step_000s"}: replaced atomically, last
    checkpoints/step_XXXXXX/       params.safetensors, optim.safetensors, manifest.json

A run writes its step-0 checkpoint first; a checkpoint is complete before latest.json names
it, and the previous one is deleted only after, so a crash at any moment leaves a loadable
checkpoint or an empty folder (diffattn.runfolder: the lock, the states, the checkpoint files).
Resume is exact: the state, the step and therefore the batches and learning rate continue
where they stopped.

Under a parallel backend (torchrun, mlx.launch: each backend's parallel.py) every process runs
this loop on the same global batches, its model's train_step keeping the process's rows and
returning the global loss; `model.state()` is called on every process (a sharded model gathers
collectively) and only the writer (`backend.is_writer`, rank 0) writes the run folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import diffattn
from diffattn import flops, optim, packing, runfolder
from diffattn.config import ConfigError, ModelConfig, TrainConfig
from diffattn.eval import POSITION_BINS, evaluate  # noqa: F401 (the loop's eval; harness.evaluate for callers)
from diffattn.params import check_params, init_params
from diffattn.runfolder import (CHECKPOINT_FORMAT, KEEP_CHECKPOINTS, CheckpointError,  # noqa: F401 (re-exported)
                                RunFolderError, find_checkpoint, load_checkpoint, prepare_out_dir,
                                save_checkpoint, write_json)

# Training holds at least the parameters, their gradients and AdamW's two moments, float32:
# 16 bytes a parameter. A model needing more than the machine's memory is refused up front
# instead of allocating until the OOM killer ends the process.
TRAIN_BYTES_PER_PARAM = 16


class Diverged(RuntimeError):
    """The loss or the parameters became NaN/Inf; the run stopped (message is one line)."""


# ---- configs as data ----------------------------------------------------------------------

def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Fields that may change on resume without breaking what the run computes.
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches")


def environment(backend, cfg: ModelConfig | None = None) -> dict:
    """Versions, device and code commit, for manifests; with cfg, the kernels its model runs
    (`kernels="auto"` resolved) as backend.kernels_used."""
    info = {"python": platform.python_version(), "numpy": np.__version__, "diffattn": diffattn.__version__,
            "platform": platform.platform(), "git_commit": git_commit()}
    try:
        import safetensors
        info["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    info["backend"] = backend.describe()
    if cfg is not None and hasattr(backend, "kernels_for"):
        info["backend"]["kernels_used"] = backend.kernels_for(cfg)
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


# ---- checkpoints (diffattn.runfolder; the names stay importable from here) --------------

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


def check_fits_memory(cfg: ModelConfig) -> None:
    """Refuse a model whose training state cannot fit this machine's memory (one line)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: nothing to check against
        return
    need = TRAIN_BYTES_PER_PARAM * cfg.num_params()
    if need > total:
        raise ConfigError(f"the model has {cfg.num_params():,} parameters: training needs at least "
                          f"{need / 2 ** 30:,.1f} GiB ({TRAIN_BYTES_PER_PARAM} bytes a parameter), more than "
                          f"this machine's {total / 2 ** 30:,.1f} GiB")


def _finished(step: int, elapsed_train: float, tcfg: TrainConfig, budget_s: float | None) -> bool:
    return step >= tcfg.steps or (budget_s is not None and elapsed_train >= budget_s)


def train(cfg: ModelConfig, tcfg: TrainConfig, data, backend, out_dir=None, *,
          params: dict | None = None, resume_from=None, budget_s: float | None = None,
          stop_after: int | None = None, ckpt_every: int | None = None, progress: bool = True,
          extra_manifest: dict | None = None, log=None, diag_every: int | None = None, diag_layers: int = 3,
          diag_log: tuple[str, ...] = ()) -> dict:
    """Train `cfg` on `data` with `backend` (a loaded Backend). Returns a summary dict.

    params       initial parameters (default init_params(cfg, tcfg.seed))
    resume_from  a run dir or checkpoint to continue from (its configs must match); resuming
                 a finished run (its checkpoint at the last step) trains nothing, writes
                 nothing and returns stopped="finished"
    budget_s     wall-clock budget for training steps (excluding eval and checkpoints); the
                 schedule then follows elapsed / budget and tcfg.steps is only an upper bound
    stop_after   stop (with a checkpoint) after this many steps in total, schedule unchanged:
                 an interrupted run, for resume tests
    ckpt_every   steps between checkpoints (default: eval_every); one at the start and a final
                 one are always written
    diag_every   every this many steps (and at the start), diffattn.diagnostics of `diag_layers`
                 strided layers on a fixed probe batch -> {"kind": "diag"} records, and to the
                 `diag_log` sinks ("tensorboard", "wandb")
    tcfg.lambda_warmup_steps > 0 sets the backend model's lambda_mix to min(1, step / N) before
    each step (spec.py's negative-map weight; a backend model without set_lambda_mix refuses)

    With out_dir, the run (its writer, under --parallel) holds the folder's lock
    (diffattn.runfolder) from its first write to its return; an OSError while writing it is a
    one-line RunFolderError naming the last good checkpoint, which stays intact.
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
    check_fits_memory(cfg)
    writer = getattr(backend, "is_writer", True)  # one process writes (rank 0 under --parallel)
    if writer:
        prepare_out_dir(out_dir, resume_from is not None)
    elif out_dir is not None:
        runfolder.check_out_dir(out_dir, resume_from is not None)  # the writer's lock is not "in use" here
    data_info = data.describe()
    env = environment(backend, cfg)
    start_step, opt_state, elapsed_train, prior_tokens = 0, None, 0.0, 0
    out = Path(out_dir) if out_dir is not None else None
    ckpt = manifest = None
    if resume_from is not None:
        params, opt_state, manifest, ckpt = load_checkpoint(resume_from)
        check_resume(manifest, cfg, tcfg, data_info, ckpt)
        start_step = int(manifest["step"])
        elapsed_train = float(manifest.get("elapsed_train_s", 0.0))
        resumed = {"from": str(ckpt), "step": start_step, "backend": manifest.get("env", {}).get("backend")}
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

    tokens_per_step = tcfg.grad_accum * tcfg.batch_size * tcfg.seq_len
    total = tcfg.steps
    ckpt_every = ckpt_every or tcfg.eval_every
    run_info = {"model_config": config_dict(cfg), "train_config": config_dict(tcfg),
                "seed": tcfg.seed, "data_seed": tcfg.data_seed, "data": data_info, "env": env,
                "budget_s": budget_s, "tokens_per_step": tokens_per_step, **(extra_manifest or {})}
    metrics_path = out / "metrics.jsonl" if out is not None and writer else None
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
            runfolder.append_record(metrics_path, obj)

    bar = Progress(total if not budget_s else None, budget_s, enabled=progress and writer)
    if "crop_fraction" in data_info:
        bar.message(f"packing {data_info['packing']}: {data_info['documents']['train']:,} training documents in "
                    f"{data_info['rows_per_epoch']:,} rows of {tcfg.seq_len + 1} tokens per epoch, "
                    f"{data_info['crop_fraction']:.1%} of their tokens cropped")
    losses: dict[int, float] = {}
    evals: list[dict] = []
    last_ckpt = resumed["from"] if resumed else None
    last_ckpt_step = None  # the step of the checkpoint this run's folder holds
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
        if evals and evals[-1]["step"] == step_done:
            manifest["eval"] = evals[-1]  # what a no-op resume of a finished run reports
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

    def summarize(step, stopped, final):
        tokens_per_s = timed_tokens / timed_s if timed_s else None
        peak, peak_source = flops.backend_peak(backend) if tokens_per_s else (None, None)
        world = getattr(backend, "world_size", 1)  # tokens_per_s is the global batch's: every rank's device
        if peak is not None and world > 1:
            peak, peak_source = peak * world, f"{world} x {peak_source}"
        return {"steps": step, "tokens": step * tokens_per_step, "stopped": stopped,
                "train_loss": losses[max(losses)] if losses else None,
                "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
                "loss_by_position": final["loss_by_position"], "position_bins": final["position_bins"],
                "accuracy": final.get("accuracy"), "answer_loss": final.get("answer_loss"),
                "tokens_per_s": tokens_per_s, "flops_per_token": flops.train_flops_per_token(cfg, tcfg.seq_len),
                "mfu": flops.mfu(cfg, tcfg.seq_len, tokens_per_s, peak) if tokens_per_s else None,
                "mfu_peak_flops": peak, "mfu_peak_source": peak_source, "optimizer": tcfg.optimizer,
                "packing": tcfg.packing, "crop_fraction": data_info.get("crop_fraction"),
                "train_seconds": elapsed_train, "wall_seconds": time.time() - t_start,
                "backend": backend.name, "device": env["backend"].get("device"), "dtype": backend.dtype,
                "attention": cfg.attention, "params": cfg.num_params(), "data": data_info["name"],
                "out_dir": str(out) if out else None, "checkpoint": last_ckpt, "losses": losses,
                "resumed_from": resumed["from"] if resumed else None}

    step = start_step
    folder_lock = runfolder.lock(out) if out is not None and writer else None
    try:
        if out is not None:
            # Checked again now that no other run can change the folder. Every process decides
            # alike: the writer writes nothing before the step-0 checkpoint below, which each
            # process enters only after this check (model.state() may be collective).
            if writer:
                runfolder.check_out_dir(out, resume_from is not None)
            if ckpt is not None and (out / "checkpoints" / "latest.json").is_file():
                if find_checkpoint(out).resolve() != ckpt.resolve():
                    raise CheckpointError(f"--out {out}: holds a newer checkpoint than {ckpt}; resuming an older "
                                          "one there would overwrite it: choose another --out")
                last_ckpt_step = start_step  # resuming this folder's own latest checkpoint
                if _finished(start_step, elapsed_train, tcfg, budget_s):
                    set_mix(start_step)
                    final = manifest.get("eval") or {"step": start_step, **evaluate(model, data, tcfg)}
                    return summarize(start_step, "finished", final)
            if writer:
                runfolder.clear_leftovers(out)
            checkpoint(start_step)  # first, so a folder holding anything else is resumable
            if writer:
                write_json(out / "run.json", {**run_info, "resumed": resumed, "argv": sys.argv,
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                if getattr(data, "tokenizer", None) is not None:
                    write_json(out / "tokenizer.json", data.tokenizer.to_json())
                runfolder.truncate_metrics(metrics_path, start_step)

        t_loop = time.time()
        set_mix(step)
        if diag_every and resumed is None:  # a resumed run has its start's record already
            run_diag(step)
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
        summary = summarize(step, stopped, evals[-1])
        record({"kind": "stop", "step": step, "reason": stopped,
                **{k: summary[k] for k in ("val_loss", "val_bpb", "accuracy", "tokens_per_s", "mfu",
                                           "mfu_peak_source", "crop_fraction", "train_seconds")}})
    except RunFolderError:
        raise
    except OSError as e:  # permissions, a full disk, ...: one line; the last good checkpoint is intact
        raise RunFolderError(f"{runfolder.describe_os_error(e)}: training stopped; last good checkpoint: "
                             f"{last_ckpt or 'none'}") from None
    finally:
        bar.close()
        if folder_lock is not None:
            folder_lock.release()
    return summary
