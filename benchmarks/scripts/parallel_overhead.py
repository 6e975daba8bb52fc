"""What DDP and FSDP2 cost on one GPU: the training step at world size 1 against the plain step
(issue 30 item 5: <= 2% tokens/s), all three measured in the same process.

    PYTHONPATH=. torchrun --standalone --nproc-per-node 1 benchmarks/scripts/parallel_overhead.py --out DIR

Rows: "none" (the backend's own CudaModel step), "ddp" (DistributedDataParallel over NCCL, one
rank), "fsdp" (fully_shard on each block and the root, one rank). Each is stage1 (B 8, L 2048;
DIFF by default), bf16 autocast with float32 master weights, torch.compile'd blocks, fused
kernels, eager launches: CUDA graphs do not capture the collectives, so the baseline is the
eager compiled step too. All three models live on the GPU at once and are timed in interleaved
rounds (none, ddp, fsdp, none, ...), each round N steps between two synchronizations, so clock
and thermal drift fall on every row alike; a row's ms/step is the median of its rounds.

At world size 1 the collectives move no data between GPUs: what remains is the wrapper's own
cost (DDP's bucket copies and NCCL launch; FSDP's all-gather / reduce-scatter copies and its
DTensor parameters in the optimizer), which is what N GPUs pay on top of their communication.
--profile: after the timing, torch.profiler records 3 steps of each model and writes
DIR/parallel_profile_MODE.txt (the ops by self CPU time and by self device time), to see where a
wrapper's extra milliseconds go.
--smoke: tiny preset, CPU (gloo), float32, composed kernels, no compile, 2 steps per round.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np
import torch

from backends.cuda import create
from benchmarks.scripts.train_step_table import git_commit
from diffattn.flops import train_flops_per_token
from diffattn.config import preset
from diffattn.params import init_params

MODES = ("none", "ddp", "fsdp")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="stage1")
    ap.add_argument("--attention", default="diff")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=5, help="steps per model before any clock (compilation)")
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    device, dtype, kernels, compile = "cuda", "bfloat16", "auto", True
    if a.smoke:
        device, dtype, kernels, compile = "cpu", "float32", "composed", False
        a.preset, a.batch_size, a.seq_len, a.warmup, a.steps, a.rounds = "tiny", 4, 16, 1, 2, 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = preset(a.preset, attention=a.attention, max_seq_len=max(a.seq_len, preset(a.preset).max_seq_len))
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1)) for _ in range(4)]
    models, warm_s, first_loss = {}, {}, {}
    for mode in MODES:
        backend = create(device=device, dtype=dtype, kernels=kernels, compile=compile, parallel=mode)
        models[mode] = backend.build(cfg, params)
        on_device = [torch.from_numpy(b).to(models[mode].device) for b in batches]
        t0 = time.perf_counter()
        first_loss[mode] = float(models[mode].train_step(on_device[0], 1e-4))
        for i in range(1, a.warmup):
            models[mode].train_step(on_device[i % 4], 1e-4)
        sync()
        warm_s[mode] = time.perf_counter() - t0
    on_device = [torch.from_numpy(b).to(models["none"].device) for b in batches]
    times = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:
            sync()
            t0 = time.perf_counter()
            for i in range(a.steps):
                models[mode].train_step(on_device[i % 4], 1e-4)
            sync()
            times[mode].append((time.perf_counter() - t0) / a.steps)
    last_loss = {m: float(models[m].train_step(on_device[0], 1e-4)) for m in MODES}
    tokens = a.batch_size * a.seq_len
    ms = {m: statistics.median(times[m]) * 1e3 for m in MODES}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    argv_shown = sys.argv[1:] if argv is None else argv
    lines = [f"# DDP / FSDP2 at world size 1 vs the plain step ({name})", "",
             f"- command: `PYTHONPATH=. torchrun --standalone --nproc-per-node 1 benchmarks/scripts/parallel_overhead.py "
             f"{' '.join(argv_shown)}`",
             f"- commit: {git_commit()}; torch {torch.__version__}; {cfg.attention} {a.preset} ({cfg.num_params() / 1e6:.1f}M "
             f"params), B {a.batch_size} x L {a.seq_len} = {tokens} tokens/step; dtype {dtype}; kernels {kernels}; "
             f"compile {'on' if compile else 'off'}; graphs off; "
             f"{a.warmup} warm-up steps, then {a.rounds} interleaved rounds of {a.steps} steps, median",
             f"- FLOPs/token {train_flops_per_token(cfg, a.seq_len) / 1e9:.2f} G (diffattn.flops' count)", "",
             "| parallel | ms/step (median) | rounds min-max ms | tokens/s | vs none | TFLOP/s | warm-up s | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        tps = tokens / (ms[m] / 1e3)
        lines.append(f"| {m} | {ms[m]:.2f} | {min(times[m]) * 1e3:.2f}-{max(times[m]) * 1e3:.2f} | {tps:,.0f} "
                     f"| {ms['none'] / ms[m]:.3f} | {train_flops_per_token(cfg, a.seq_len) * tps / 1e12:.0f} | {warm_s[m]:.0f} "
                     f"| {first_loss[m]:.4f} -> {last_loss[m]:.4f} |")
    verdict = [f"- issue 30 item 5, {m}: {1 - ms['none'] / ms[m]:+.1%} tokens/s lost against none "
               f"({'MET' if ms['none'] / ms[m] >= 0.98 else 'NOT MET'}, goal <= 2%)" for m in ("ddp", "fsdp")]
    text = "\n".join(lines + [""] + verdict) + "\n"
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "parallel_overhead.md"), "w") as f:
        f.write(text)
    if a.profile:
        for m in MODES:
            write_profile(models[m], on_device, os.path.join(a.out, f"parallel_profile_{m}.txt"), device)
    del models
    gc.collect()
    bad = [m for m in MODES if not (np.isfinite(first_loss[m]) and np.isfinite(last_loss[m]))]
    return 1 if bad else 0


def write_profile(model, batches, path, device):
    """3 profiled steps (after one unprofiled): the top ops by self CPU and by self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    model.train_step(batches[0], 1e-4)
    with profile(activities=activities) as prof:
        for i in range(3):
            model.train_step(batches[i % 4], 1e-4)
        if device == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device == "cuda" else [])
    with open(path, "w") as f:
        for k in keys:
            f.write(f"## sorted by {k} (3 steps)\n{table.table(sort_by=k, row_limit=30, max_name_column_width=70)}\n")


if __name__ == "__main__":
    sys.exit(main())
