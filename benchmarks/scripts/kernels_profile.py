"""What bounds the fused kernels, read from the hardware counters. Nsight Compute (ncu) profiles one
forward+backward of the fused path and of cuDNN's composed path at the kernel table's shapes, and
`summarize` reduces the reports to a table per kernel (time, tensor-pipe and issue use, occupancy,
where the warps wait) and, for our kernels, the SASS instructions the warps wait at most.

On the GPU machine (a runtime where ncu reads the counters: Firecracker, .library/device/KINDS.md):
    PYTHONPATH=. python benchmarks/scripts/kernels_profile.py profile --out $OUT [--commit C]
Anywhere, from the CSVs `profile` exported (unpacked from its .tgz):
    python benchmarks/scripts/kernels_profile.py summarize DIR [--out FILE.md]
What `profile` runs under ncu, once per configuration:
    PYTHONPATH=. python benchmarks/scripts/kernels_profile.py launch --variant diff_v1 --impl fused

ncu runs with --clock-control none (the GPU keeps its own clocks, as when timed) and replays each
kernel once per counter pass, restoring memory between passes, so a kernel's counters come from
several runs of the same launch. Shapes as kernels_table.py: B*L = 16k tokens, 16 DIFF heads, bf16.
"""
import argparse
import csv
import glob
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIGS = [(v, impl) for v in ("diff_v1", "diff_v2") for impl in ("fused", "composed:cudnn")]


def launch(variant, impl, L, d):
    """Compile and warm up, then one forward+backward inside the profiler's range (cudaProfilerStart /
    Stop: ncu runs with --profile-from-start off, so only these kernels are profiled)."""
    import torch

    sys.path.insert(0, HERE)
    import kernels_table as table

    B = max(1, table.TOKENS // L)
    x32, do32 = table.make_inputs(variant, B, L, d, "cuda", seed=L + d)
    x = {n: (t.to(torch.bfloat16) if n != "lam" or variant == "diff_v2" else t).requires_grad_(True)
         for n, t in x32.items()}
    do = do32.to(torch.bfloat16)
    fn = table.impls(variant, "cuda")[impl]
    for _ in range(3):
        fn(**x).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn(**x).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _ncu():
    found = shutil.which("ncu") or sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))[-1:]
    if not found:
        raise SystemExit("kernels_profile: no ncu on this machine (Nsight Compute is needed)")
    return found if isinstance(found, str) else found[0]


def profile(out, L, d, commit):
    ncu = _ncu()
    work = os.path.join(out, "ncu")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for variant, impl in CONFIGS:
        name = f"{variant}_{impl.replace('composed:', '')}_L{L}_d{d}"
        rep = os.path.join(work, name)
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--set", "full",
               "--import-source", "no", "--force-overwrite", "--export", rep,
               sys.executable, os.path.abspath(__file__), "launch", "--variant", variant, "--impl", impl,
               "--length", str(L), "--dim", str(d)]
        print("+", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        with open(rep + "_ncu.log", "w") as f:
            f.write(run.stdout + run.stderr)
        if run.returncode:
            print(f"{name}: ncu rc {run.returncode}\n{(run.stdout + run.stderr)[-2000:]}", flush=True)
            continue
        for page, extra in (("raw", []), ("details", []), ("source", ["--print-source", "sass"])):
            exp = subprocess.run([ncu, "--import", rep + ".ncu-rep", "--page", page, "--csv", *extra],
                                 capture_output=True, text=True)
            with open(f"{rep}_{page}.csv", "w") as f:
                f.write(exp.stdout if exp.returncode == 0 else f"# ncu rc {exp.returncode}\n{exp.stderr}")
        os.remove(rep + ".ncu-rep")  # the CSVs carry what summarize reads; the report is too large to keep
    bundle = os.path.join(out, f"h200_kernels_profile_{commit}.tgz")
    with tarfile.open(bundle, "w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(work, "*"))):
            tar.add(path, arcname=os.path.basename(path))
    try:
        print(summarize(work), flush=True)
    except Exception as e:  # the CSVs are in the bundle: summarize again where this can be mended
        print(f"summarize failed: {type(e).__name__}: {e}", flush=True)


# ---- summarize: ncu's CSV pages -> markdown ----

def _read_csv(path):
    with open(path, newline="") as f:
        text = f.read()
    if text.startswith("# ncu rc"):
        return None
    # ncu prints its own "==PROF==" lines before the table in some versions
    start = text.find('"')
    return list(csv.reader(io.StringIO(text[start:])))


def raw_rows(path):
    """The raw page: one row per profiled kernel, every metric a column (second line: units)."""
    table = _read_csv(path)
    header, units, rows = table[0], table[1], table[2:]
    return [dict(zip(header, r)) for r in rows], dict(zip(header, units))


def _num(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return float("nan")


STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
COLUMNS = [  # (heading, metric): what the table shows for each kernel
    ("us", "gpu__time_duration.sum"),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("tensor %", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("issue %", "sm__inst_issued.avg.pct_of_peak_sustained_active"),
    ("DRAM %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("warps/SM", "sm__warps_active.avg.per_cycle_active"),
    ("regs", "launch__registers_per_thread"),
    ("grid", "launch__grid_size"),
]


def short(name):
    name = re.sub(r"\(.*", "", name)
    return name if len(name) <= 48 else name[:45] + "..."


def kernel_table(rows, units):
    cols = [(h, m) for h, m in COLUMNS if m in units]
    stalls = sorted({STALL.match(k).group(1) for k in units if STALL.match(k)})
    lines = ["| kernel | " + " | ".join(h for h, _ in cols) + " | cycles a warp waits per issue, top 4 |",
             "|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        cells = []
        for h, m in cols:
            v = _num(r[m])
            if m == "gpu__time_duration.sum":
                v = v / 1e3 if units[m] == "nsecond" else v * (1e3 if units[m] == "msecond" else 1)
            cells.append(f"{v:.0f}" if h in ("us", "regs", "grid") else f"{v:.1f}")
        waits = sorted(((_num(r[f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio"]), s)
                        for s in stalls), reverse=True)[:4]
        cells.append(", ".join(f"{s} {v:.2f}" for v, s in waits))
        lines.append(f"| {short(r['Kernel Name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source_hotspots(path, top=12):
    """The SASS instructions with the most stall samples, per kernel of a source-page export."""
    text = open(path).read()
    if text.startswith("# ncu rc"):
        return [text.splitlines()[0]]
    out = []
    # one block per kernel: a "Kernel Name" line (or similar) then a CSV table with an Address column
    for block in re.split(r'\n(?="?Kernel Name)', text):
        start = block.find('"Address"')
        if start < 0:
            continue
        title = block[:start].strip().splitlines()[0] if block[:start].strip() else "kernel"
        table = list(csv.reader(io.StringIO(block[start:])))
        head, rows = table[0], [r for r in table[1:] if len(r) == len(table[0])]
        samples = next((c for c in head if c.startswith("Warp Stall Sampling (All")), None)
        if samples is None:
            continue
        i, src = head.index(samples), head.index("Source")
        total = sum(_num(r[i]) for r in rows) or 1.0
        hot = sorted(rows, key=lambda r: -_num(r[i]))[:top]
        out.append(f"{title}: {int(total)} samples")
        for r in hot:
            out.append(f"  {100 * _num(r[i]) / total:5.1f}%  {r[head.index('Address')]}  {r[src].strip()}")
    return out


def summarize(work):
    parts = []
    for raw in sorted(glob.glob(os.path.join(work, "*_raw.csv"))):
        name = os.path.basename(raw)[:-len("_raw.csv")]
        got = _read_csv(raw)
        if not got:
            parts.append(f"## {name}\n\nno raw page: {open(raw).read()[:300]}")
            continue
        rows, units = raw_rows(raw)
        parts.append(f"## {name}\n\n{kernel_table(rows, units)}")
        src = raw[:-len("_raw.csv")] + "_source.csv"
        if os.path.exists(src):
            parts.append("```\n" + "\n".join(source_hotspots(src)) + "\n```")
    return "\n\n".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("launch")
    a.add_argument("--variant", choices=("diff_v1", "diff_v2"), required=True)
    a.add_argument("--impl", default="fused")
    a.add_argument("--length", type=int, default=8192)
    a.add_argument("--dim", type=int, default=64)
    b = sub.add_parser("profile")
    b.add_argument("--out", required=True)
    b.add_argument("--length", type=int, default=8192)
    b.add_argument("--dim", type=int, default=64)
    b.add_argument("--commit", default="unknown")
    c = sub.add_parser("summarize")
    c.add_argument("dir")
    c.add_argument("--out")
    args = p.parse_args()
    if args.cmd == "launch":
        launch(args.variant, args.impl, args.length, args.dim)
    elif args.cmd == "profile":
        profile(args.out, args.length, args.dim, args.commit)
    else:
        text = summarize(args.dir)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
