"""A training process that SIGKILLs itself at one stage of its run (for tests/test_faults.py).

    python tests/faults_child.py OUT BACKEND STAGE

Trains the FAULT_RUN run of test_faults into OUT on BACKEND (CPU) and dies, by SIGKILL, at
STAGE. The file-writing stages die with the file's temporary copy written and torn in half,
just before it would have been renamed into place: what a kill in the middle of the write
leaves, plus the stale temporary file.

    step0          writing the step-0 checkpoint's params (nothing else written yet)
    before-first   during step 1, after the step-0 checkpoint, before the step-2 one
    params         writing the step-4 checkpoint's params.safetensors
    optim          writing the step-4 checkpoint's optim.safetensors
    manifest       writing the step-4 checkpoint's manifest.json
    pointer        writing latest.json to name the step-4 checkpoint
    pruning        deleting the step-0 checkpoint, after latest.json names step 4
    metrics        appending step 5's line to metrics.jsonl (half a line written)
"""
import json
import os
import shutil
import signal
import sys

from diffattn import backend, data, harness, runfolder
from diffattn.config import TrainConfig, preset

KILL_STEP = 4
FILE_STAGES = {"step0": ("step_000000", "params.safetensors"), "params": ("step_000004", "params.safetensors"),
               "optim": ("step_000004", "optim.safetensors"), "manifest": ("step_000004", "manifest.json")}


def fault_run():
    """(cfg, tcfg, ckpt_every) of every run in the fault tests: 8 steps, a checkpoint every 2."""
    cfg = preset("tiny", d_model=32, max_seq_len=16)
    t = TrainConfig(batch_size=2, seq_len=16, steps=8, warmup_steps=2, eval_every=4, eval_batches=1, lr=1e-2)
    return cfg, t, 2


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def tear(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def arm(stage, d):
    real_replace, real_rmtree, real_append = os.replace, shutil.rmtree, runfolder.append_record

    def replace(src, dst):
        where = (os.path.basename(os.path.dirname(dst)), os.path.basename(dst))
        if FILE_STAGES.get(stage) == where or (
                stage == "pointer" and where[1] == "latest.json" and json.load(open(src))["step"] == KILL_STEP):
            tear(src)
            die()
        real_replace(src, dst)

    def rmtree(path, *a, **k):
        if stage == "pruning" and os.path.basename(path) == "step_000000":
            os.unlink(os.path.join(path, "params.safetensors"))
            die()
        real_rmtree(path, *a, **k)

    def append_record(path, obj):
        if stage == "metrics" and obj.get("kind") == "train" and obj["step"] == KILL_STEP + 1:
            line = json.dumps(obj)
            with open(path, "a") as f:
                f.write(line[: len(line) // 2])
            die()
        real_append(path, obj)

    real_batch = d.train_batch

    def train_batch(step, *a, **k):
        if stage == "before-first" and step == 1:
            die()
        return real_batch(step, *a, **k)

    os.replace, shutil.rmtree, runfolder.append_record, d.train_batch = replace, rmtree, append_record, train_batch


if __name__ == "__main__":
    out, name, stage = sys.argv[1:4]
    b = backend.load(name, device="cpu", dtype=None if name == "numpy" else "float32")
    d = data.load("builtin:pydoc")
    arm(stage, d)
    cfg, t, ckpt_every = fault_run()
    harness.train(cfg, t, d, b, out, ckpt_every=ckpt_every, progress=False)
    sys.exit(f"{stage}: the run ended without being killed")
