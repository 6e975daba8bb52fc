"""Where a training step leaves the GPU idle: the gaps between consecutive GPU kernels of a few
profiled steps, largest first, with the kernels on either side (a gap after a kernel that the
host waits for, or before a launch the host was slow to make, shows here and nowhere in a table
of kernel times).

    PYTHONPATH=. python benchmarks/scripts/step_gaps.py --preset stage1 --variant diff --seq-len 2048 --tokens 16384 [--compile] [--graphs]
"""
import argparse
import sys

import torch

from benchmarks.scripts.train_step_table import step_case


def kernel_intervals(prof):
    """(start us, end us, name) of every GPU kernel / memcpy / memset the profiler saw, by start."""
    spans = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(spans)


def idle_gaps(spans):
    """(gap, kernel before, kernel after) for every stretch in which no kernel of `spans` (sorted
    (start, end, name), possibly overlapping) runs."""
    gaps, busy_end, last = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > busy_end:
            gaps.append((start - busy_end, last, name))
        if end >= busy_end:
            busy_end, last = end, name
    return gaps


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="stage1")
    ap.add_argument("--variant", default="diff")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="replay the step as a CUDA graph")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    _, model, (batch,), _ = step_case(a.preset, a.variant, a.seq_len, a.tokens, compile=a.compile, graphs=a.graphs,
                                      n_batches=1)
    for _ in range(5):  # compiles, and with --graphs records the graph
        float(model.train_step(batch, 1e-3))
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            model.train_step(batch, 1e-3)
        torch.cuda.synchronize()
    spans = kernel_intervals(prof)
    gaps = idle_gaps(spans)
    window = spans[-1][1] - spans[0][0]
    idle = sum(g for g, _, _ in gaps)
    print(f"{a.preset} {a.variant} compile={a.compile} graphs={a.graphs}: {a.steps} steps, GPU window {window / 1e3 / a.steps:.2f} ms/step, "
          f"idle between kernels {idle / 1e3 / a.steps:.2f} ms/step in {len(gaps)} gaps "
          f"({sum(g > 20 for g, _, _ in gaps)} over 20 us)")
    print("| gap us | after kernel | before kernel |\n|---|---|---|")
    for g, n0, n1 in sorted(gaps, reverse=True)[:a.top]:
        print(f"| {g:.0f} | {n0[:70]} | {n1[:70]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
