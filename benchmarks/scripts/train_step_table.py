"""Whole training steps on a GPU: tokens/s and MFU per preset x variant x torch.compile
(issue 4 item 2, issue 7 target 5: stage1 at L=2048 >= 40% MFU, DIFF >= 0.92x vanilla tokens/s).

    PYTHONPATH=. python benchmarks/scripts/train_step_table.py --out DIR [--commit HASH]

A step = forward, backward, global-norm clip and fused AdamW (the backend's train_step) on a
(B, L+1) batch of random tokens, bf16 autocast with float32 master weights, kernels="auto"
(fused Triton DIFF attention, SDPA's fused kernel for vanilla), eager or torch.compile'd blocks,
launched from Python or replayed as one CUDA graph (--graphs). Timing: after warm-up steps
(compilation, autotuning, the graph's recording), wall time of N steps between two
torch.cuda.synchronize() calls, /N.

SM MHz, W, power-capped: means over the timed steps of GPU 0's SM clock, board power and the share
of samples NVML held the clock for the power cap (_common.GpuSampler, every 10 ms); J/step: the
board's energy counter over the timed steps, / N. The counter is coarse: over the default 20 steps
(~1 s) it read up to 10% off the sampled power on the H200 (runs 31-32); compare twins' energy
with --steps 200 or more.

Peak GiB: the allocator's peak over the timed steps; with --graphs, over the warm-up and the
recording (a replay allocates nothing; its tensors live in the graph's pool from the recording on).

Host ms/step: the time Python takes to issue one step while the GPU is held busy by a
torch.cuda._sleep kernel, so that no launch waits on the GPU. Where it nears ms/step the host
paces the step and the GPU idles between kernels.

FLOPs per token (stated in the output):
    6 * N_params                        (forward 2, backward 4 per parameter; the tied embedding
                                         counted once, as the LM head matmul)
  + 3 * n_layers * q_heads * L * (d_qk + d_v)
                                        (causal attention: per query head QK^T 2 L d_qk and AV
                                         2 L d_v over L keys, halved for causality; x3 forward
                                         + backward)
MFU = FLOPs/token * tokens/s / peak; peak = the datasheet's dense bf16 figure and, second, a
bf16 8192^3 matmul measured in the same run. PaLM/nanoGPT count attention without the causal
halving (diffattn.flops.train_flops_per_token(causal=False)); that convention's MFU is printed too.
--smoke: tiny preset, CPU, float32, composed kernels, 2 steps (tests this script; no MFU).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks import _common
from backends.cuda import create
from backends.cuda import train
from diffattn import flops
from diffattn.config import preset
from diffattn.params import init_params


def step_case(name, variant, seq_len, tokens, micro=1, compile=True, graphs=False, device="cuda",
              dtype="bfloat16", kernels="auto", n_batches=4, kernel_options=None):
    """The model (init seed 0) and random token batches of one row: `micro` micro-batches of
    `tokens` tokens each per optimizer step, the fused kernels under kernel_options (KernelOptions,
    None: the defaults). Returns (cfg, model, batches, batch size)."""
    cfg = preset(name, attention=variant)
    batch_size = max(1, tokens // seq_len)
    shape = (micro, batch_size, seq_len + 1) if micro > 1 else (batch_size, seq_len + 1)
    backend = create(device=device, dtype=dtype, kernels=kernels, compile=compile, graphs=graphs,
                     **({"kernel": kernel_options} if kernel_options is not None else {}))
    model = backend.build(cfg, init_params(cfg, seed=0))
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, cfg.vocab_size, shape)).to(device) for _ in range(n_batches)]
    return cfg, model, batches, batch_size


def host_ms(model, batch, reps=3, sleep_cycles=1_000_000_000):
    """Host time to issue one step with the GPU stalled (see the module docstring), best of reps.
    sleep_cycles (~0.5 s at H100/H200 clocks) outlasts any step's host time; a result near it
    means the host blocked anyway (a full launch queue or a synchronization in the step)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)
        t0 = time.perf_counter()
        model.train_step(batch, 1e-3)
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return min(times) * 1e3


def measure(name, variant, seq_len, tokens, micro, compile, graphs, device, dtype, kernels, warmup, steps, profile=None,
            kernel_options=None):
    """One row: `micro` micro-batches of `tokens` tokens each per optimizer step. A variant written
    VARIANT:KERNELS (e.g. diff:composed) runs with those kernels instead of the run's."""
    attention, _, own = variant.partition(":")
    cfg, model, batches, batch_size = step_case(name, attention, seq_len, tokens, micro, compile, graphs,
                                                device, dtype, own or kernels, kernel_options=kernel_options)
    if graphs:  # the eager warm-up steps and the recording stay out of the clock
        warmup = max(warmup, train.StepGraph.STEPS_TO_STEADY)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    reset_peak = torch.cuda.reset_peak_memory_stats if device == "cuda" else (lambda: None)
    if graphs:  # a replay allocates nothing: a graph's peak is its recording's
        reset_peak()
    t0 = time.perf_counter()
    losses = [float(model.train_step(batches[i % 4], 1e-3)) for i in range(warmup)]
    warm_s = time.perf_counter() - t0
    if not graphs:
        reset_peak()
    sync()
    with _common.GpuSampler() as gpu:
        t0 = time.perf_counter()
        for i in range(steps):
            loss = model.train_step(batches[i % 4], 1e-3)
        sync()
        step_s = (time.perf_counter() - t0) / steps
    losses.append(float(loss))
    host = host_ms(model, batches[0]) if device == "cuda" else float("nan")
    try:  # a profile is a diagnosis: failing, it must not cost the row its timing
        kernel_summary = profile_steps(model, batches[0], profile) if profile else ""
    except Exception as e:
        kernel_summary = f"profile FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"{name} {variant}: non-finite loss {losses}")
    return dict(preset=name, variant=variant, compile=compile, graphs=graphs, micro=micro, B=batch_size, L=seq_len,
                params=cfg.num_params(), step_ms=step_s * 1e3, host_ms=host, tokens_s=micro * batch_size * seq_len / step_s,
                flops_tok=flops.train_flops_per_token(cfg, seq_len),
                palm_flops_tok=flops.train_flops_per_token(cfg, seq_len, causal=False),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
                warm_s=warm_s, loss_first=losses[0], loss_last=losses[-1], kernels=kernel_summary, steps=steps,
                gpu=gpu.summary() if device == "cuda" else {})


KERNEL_KINDS = (("attention", ("attn", "attention", "fmha", "flash", "paired", "cudnn")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
                ("optimizer", ("adam", "foreach", "multi_tensor")))


def profile_steps(model, batch, path, steps=3):
    """Top CUDA kernels of a few steps, and their time by kind (matmul, attention, optimizer,
    other = elementwise/normalization/copies), to see what bounds the step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.train_step(batch, 1e-3)
        torch.cuda.synchronize()
    events = prof.key_averages()
    by_kind = {}
    for e in events:
        t = e.self_device_time_total
        kind = next((k for k, keys in KERNEL_KINDS if any(w in e.key.lower() for w in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + t / steps / 1e3  # ms per step
    total = max(sum(by_kind.values()), 1e-9)
    summary = ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    with open(path, "w") as f:
        f.write(f"GPU kernel time per step: {total:.1f} ms = {summary}\n\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=40))
    return f"{total:.1f} ms of kernels: {summary}"


def gpu_cells(gpu: dict, steps: int) -> str:
    """The table's SM MHz, W, power-capped and J/step cells from a GpuSampler summary ('-' without one)."""
    if not gpu:
        return "| - | - | - | - |"
    return f"| {gpu['sm_mhz']:.0f} | {gpu['watts']:.0f} | {gpu['power_capped']:.0%} | {gpu['joules'] / steps:.1f} |"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DIFFATTN_COMMIT", "unknown")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="stage1:2048:16384,small:256:16384",
                    help="comma-separated preset:seq_len:tokens_per_micro_batch[:micro_batches_per_step]")
    ap.add_argument("--variants", default="diff,vanilla,diff_v2",
                    help="attention variants; VARIANT:KERNELS picks that row's kernels, e.g. diff:composed "
                         "(the DIFF model with SDPA calls, compiled like the rest: the fused kernels' alternative)")
    ap.add_argument("--compile", default="off,on", help="off, on or off,on")
    ap.add_argument("--compile-presets", default="stage1", help="presets also timed compiled")
    ap.add_argument("--inductor", default="", help="KEY=INT,...: Inductor options over train.COMPILE_OPTIONS "
                    "for this run's compiled rows (A/B of the defaults)")
    ap.add_argument("--graphs", default="off", help="off, on or off,on: the step replayed as a CUDA graph")
    _common.kernel_option_args(ap)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new rows after this")
    ap.add_argument("--profile", default="", help="comma-separated preset:variant to profile (each compile "
                    "mode), kernel tables written to --out")
    ap.add_argument("--out", default=".")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    for kv in filter(None, a.inductor.split(",")):
        key, value = kv.split("=")
        train.COMPILE_OPTIONS[key] = int(value)
    kernel_options = _common.kernel_options(a.kernel_options, a.tiles)
    device, dtype, kernels = ("cpu", "float32", "composed") if a.smoke else ("cuda", "bfloat16", "auto")
    if a.smoke:
        a.runs, a.compile, a.graphs, a.warmup, a.steps = "tiny:16:32,tiny:16:32:2", "off", "off", 1, 2
    os.makedirs(a.out, exist_ok=True)
    head = [f"# Training-step throughput ({'smoke, CPU' if a.smoke else torch.cuda.get_device_name()})", "",
            f"- command: `PYTHONPATH=. python {' '.join(sys.argv if argv is None else ['benchmarks/scripts/train_step_table.py', *argv])}`",
            f"- commit: {a.commit or git_commit()}; torch {torch.__version__}; dtype {dtype}"
            f"{' (autocast, fp32 master weights)' if dtype == 'bfloat16' else ''}; kernels {kernels}; {a.warmup} warm-up + {a.steps} timed steps, synchronized wall clock",
            f"- Inductor options of compiled rows: {train.COMPILE_OPTIONS}; kernel options: {a.kernel_options or 'defaults'}; "
            f"tiles: {a.tiles or 'tuned'}",
            "- FLOPs/token = 6 * params + 3 * n_layers * q_heads * L * (d_qk + d_v) (causal attention, fwd+bwd); "
            "MFU(PaLM) counts attention without the causal halving (nanoGPT's 12 L H Q T)"]
    peak = mm = float("nan")
    if not a.smoke:
        peak = flops.nvidia_peak(torch.cuda.get_device_name(), "bfloat16") or float("nan")
        mm = _common.matmul_tflops() * 1e12
        head.append(f"- peak: datasheet dense bf16 {peak / 1e12:.0f} TFLOP/s; measured bf16 8192^3 matmul "
                    f"{mm / 1e12:.0f} TFLOP/s (this run)")
    rows, notes = [], []
    for run in a.runs.split(","):
        name, seq_len, tokens, *micro = run.split(":")
        micro = int(micro[0]) if micro else 1
        for compile in [c == "on" for c in a.compile.split(",")]:
            if compile and name not in a.compile_presets.split(","):
                continue
            for graphs, variant in [(g == "on", v) for g in a.graphs.split(",") for v in a.variants.split(",")]:
                row = f"{name} {variant} compile={'on' if compile else 'off'} graphs={'on' if graphs else 'off'}"
                if time.perf_counter() - start > a.budget_s:
                    notes.append(f"not run (time budget): {row}")
                    continue
                try:
                    prof = (os.path.join(a.out, f"profile_{name}_{variant}_compile_{'on' if compile else 'off'}"
                                                f"{'_graphs' if graphs else ''}.txt")
                            if f"{name}:{variant}" in a.profile.split(",") and micro == 1 and not a.smoke else None)
                    r = measure(name, variant, int(seq_len), int(tokens), micro, compile, graphs, device, dtype, kernels,
                                a.warmup, a.steps, prof, kernel_options)
                except Exception as e:  # one failing row must not hide the others
                    notes.append(f"FAILED {row}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    continue
                rows.append(r)
                print(f"{row}: {r['step_ms']:.1f} ms/step (host {r['host_ms']:.1f}), {r['tokens_s']:.0f} tok/s", flush=True)
    table = ["| preset | variant | compile | graphs | micro x B x L | params | ms/step | host ms/step | tokens/s | vs vanilla "
             "| TFLOP/s | MFU (datasheet) | MFU (measured matmul) | MFU (PaLM conv.) | peak GiB | warm-up s | loss first -> last "
             "| SM MHz | W | power-capped | J/step |",
             "|" + "---|" * 21]
    for r in rows:
        key = lambda x: (x["preset"], x["compile"], x["graphs"], x["micro"], x["L"])  # noqa: E731
        base = next((x for x in rows if key(x) == key(r) and x["variant"] == "vanilla"), None)
        tf = r["flops_tok"] * r["tokens_s"]
        table.append(
            f"| {r['preset']} | {r['variant']} | {'on' if r['compile'] else 'off'} | {'on' if r['graphs'] else 'off'} "
            f"| {r['micro']} x {r['B']} x {r['L']} | {r['params'] / 1e6:.1f}M "
            f"| {r['step_ms']:.1f} | {r['host_ms']:.1f} | {r['tokens_s']:,.0f} | {r['tokens_s'] / base['tokens_s'] if base else float('nan'):.3f} "
            f"| {tf / 1e12:.0f} | {tf / peak:.1%} | {tf / mm:.1%} | {r['palm_flops_tok'] * r['tokens_s'] / peak:.1%} "
            f"| {r['peak_gib']:.1f} | {r['warm_s']:.0f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
            + gpu_cells(r["gpu"], r["steps"]))
    verdict = []
    for compile, graphs, micro in sorted({(r["compile"], r["graphs"], r["micro"]) for r in rows}):
        d, v = (next((x for x in rows if (x["preset"], x["variant"], x["compile"], x["graphs"], x["micro"])
                      == ("stage1", var, compile, graphs, micro)), None) for var in ("diff", "vanilla"))
        if d and v:
            mfu = d["flops_tok"] * d["tokens_s"] / peak
            verdict.append(f"- issue 7 target 5, stage1 L={d['L']} compile={'on' if compile else 'off'} "
                           f"graphs={'on' if graphs else 'off'} micro-batches={micro}: DIFF MFU "
                           f"{mfu:.1%} ({'MET' if mfu >= 0.40 else 'NOT MET'}, goal >= 40% of datasheet); DIFF/vanilla "
                           f"tokens/s {d['tokens_s'] / v['tokens_s']:.3f} ({'MET' if d['tokens_s'] >= 0.92 * v['tokens_s'] else 'NOT MET'}, goal >= 0.92)")
    kernel_lines = [f"- kernels, {r['preset']} {r['variant']} compile={'on' if r['compile'] else 'off'} "
                    f"graphs={'on' if r['graphs'] else 'off'}: {r['kernels']}"
                    for r in rows if r["kernels"]]
    text = "\n".join(head + [""] + table + [""] + verdict + kernel_lines + [""] + [f"- {n}" for n in notes]) + "\n"
    print(text)
    with open(os.path.join(a.out, "train_step_table.md"), "w") as f:
        f.write(text)
    return 0 if rows and not any(n.startswith("FAILED") for n in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
