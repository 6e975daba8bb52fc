"""What bounds the fused kernels, read from the hardware counters. Nsight Compute (ncu) profiles one
forward+backward of the fused path and of cuDNN's composed path at the kernel table's shapes, and
`summarize` reduces the reports to a table per kernel (time, tensor-pipe and issue use, occupancy,
where the warps wait) and, for our kernels, the SASS instructions the warps wait at most.

On the GPU machine (a runtime where ncu reads the counters: Firecracker, .library/device/KINDS.md):
    PYTHONPATH=. python benchmarks/scripts/kernels_profile.py profile --out $OUT [--commit C]
        [--length 8192] [--heads 16] [--configs diff_v1:fused,vanilla:composed,...]
        [--options tma=0/tma=1]
Anywhere, from the CSVs `profile` exported (unpacked from its .tgz):
    python benchmarks/scripts/kernels_profile.py summarize DIR [--out FILE.md]
What `profile` runs under ncu, once per configuration (and per option set, for fused ones):
    PYTHONPATH=. python benchmarks/scripts/kernels_profile.py launch --variant diff_v1 --impl fused

ncu runs with --clock-control none (the GPU keeps its own clocks, as when timed) and replays each
kernel once per counter pass, restoring memory between passes, so a kernel's counters come from
several runs of the same launch. Shapes as kernels_table.py: B*L = 16k tokens, --heads DIFF heads
of d (V1: v 2d), bf16; "vanilla" is the DIFF model's twin, SDPA over --heads heads of 2d.
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


def launch(variant, impl, L, d, heads, options):
    """Compile and warm up, then one forward+backward inside the profiler's range (cudaProfilerStart /
    Stop: ncu runs with --profile-from-start off, so only these kernels are profiled). options: the
    fused kernels' launch options (KernelOptions), as kernels_sweep.py writes them.
    variant "vanilla": the DIFF model's vanilla twin, SDPA over `heads` heads of 2d (impl ignored)."""
    import torch

    from benchmarks._common import kernel_options
    from benchmarks.scripts import kernels_table as table
    from backends.cuda.ops import vanilla_attention

    table.HEADS = heads
    B = max(1, table.TOKENS // L)
    if variant == "vanilla":
        x = {n: torch.randn(B, L, heads, 2 * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
             for n in "qkv"}
        do = torch.randn(B, L, heads, 2 * d, device="cuda", dtype=torch.bfloat16)
        fn = vanilla_attention
    else:
        x32, do32 = table.make_inputs(variant, B, L, d, "cuda", seed=L + d)
        x = {n: (t.to(torch.bfloat16) if n != "lam" or variant == "diff_v2" else t).requires_grad_(True)
             for n, t in x32.items()}
        do = do32.to(torch.bfloat16)
        fn = table.impls(variant, "cuda", kernel_options(options))[impl]
    for _ in range(3):
        fn(**x).backward(do)
    for t in x.values():  # else the profiled backward adds into .grad: kernels the op does not launch
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn(**x).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _ncu():
    """Nsight Compute's command line: on PATH, else the newest under /opt/nvidia/nsight-compute."""
    found = shutil.which("ncu") or max(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), default=None)
    if found is None:
        raise SystemExit("kernels_profile: no ncu on this machine (Nsight Compute is needed)")
    return found


def profile(out, L, d, heads, commit, configs, option_sets):
    ncu = _ncu()
    work = os.path.join(out, "ncu")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [(v, impl, o) for v, impl in configs for o in (option_sets if impl == "fused" else [""])]
    for variant, impl, options in runs:
        tag = "_" + re.sub(r"[^A-Za-z0-9]+", "-", options) if options else ""
        name = f"{variant}_{impl.replace('composed:', '')}{tag}_L{L}_d{d}_h{heads}"
        rep = os.path.join(work, name)
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--set", "full",
               "--import-source", "no", "--force-overwrite", "--export", rep,
               sys.executable, os.path.abspath(__file__), "launch", "--variant", variant, "--impl", impl,
               "--length", str(L), "--dim", str(d), "--heads", str(heads), "--options", options]
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
    bundle = os.path.join(out, f"kernels_profile_{commit}.tgz")  # the exported pages, for summarize
    with tarfile.open(bundle, "w:gz") as tar:
        for path in sorted(glob.glob(os.path.join(work, "*"))):
            tar.add(path, arcname=os.path.basename(path))
    try:
        print(summarize(work), flush=True)
    except Exception as e:  # the CSVs are in the bundle: summarize again where this can be mended
        print(f"summarize failed: {type(e).__name__}: {e}", flush=True)


# ---- summarize: ncu's CSV pages -> markdown ----

def _table(text):
    """A CSV page -> (its header, one dict a complete row)."""
    header, *rows = csv.reader(io.StringIO(text))
    return header, [dict(zip(header, r)) for r in rows if len(r) == len(header)]


def _num(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return float("nan")


SAMPLES = "Warp Stall Sampling (All Samples)"  # the source page's samples of an instruction
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
COLUMNS = [  # (heading, metric, format): what the kernel table shows
    ("ms", "gpu__time_duration.sum", ".3f"),
    ("tensor pipe %", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", ".1f"),
    ("issue %", "smsp__issue_active.avg.pct_of_peak_sustained_active", ".1f"),
    ("XU (MUFU) %", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active", ".1f"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct", ".1f"),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed", ".1f"),
    ("DRAM TB/s", "dram__bytes.sum.per_second", ".2f"),
    ("warps a SM", "sm__warps_active.avg.per_cycle_active", ".1f"),
    ("regs", "launch__registers_per_thread", ".0f"),
    ("grid", "launch__grid_size", ".0f"),
]
MIN_MS = 0.05  # kernels shorter than this (fills, casts) are left out of the tables


def kernel_table(path):
    """The raw page (one row per kernel, every metric a column, units in the first data row) -> a
    markdown table of COLUMNS and the top stall reasons, in cycles a warp waits per issued
    instruction (ncu's 'warp state' ratios)."""
    _, (units, *rows) = _table(open(path).read())
    scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3}
    tera = {"byte/s": 1e-12, "Kbyte/s": 1e-9, "Mbyte/s": 1e-6, "Gbyte/s": 1e-3, "Tbyte/s": 1.0}
    cols = [c for c in COLUMNS if c[1] in units]
    stalls = [k for k in units if STALL.match(k)]
    lines = ["| kernel | " + " | ".join(h for h, _, _ in cols) + " | stalls (cycles per issue), top 4 |",
             "|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        ms = _num(r["gpu__time_duration.sum"]) * scale[units["gpu__time_duration.sum"]]
        if ms < MIN_MS:
            continue
        cells = []
        for _, metric, spec in cols:
            v = _num(r[metric])
            v = ms if metric == "gpu__time_duration.sum" else v * tera.get(units[metric], 1.0)
            cells.append(format(v, spec))
        waits = sorted(((_num(r[k]), STALL.match(k).group(1)) for k in stalls), reverse=True)[:4]
        cells.append(", ".join(f"{name} {v:.2f}" for v, name in waits))
        lines.append(f"| {short(r['Kernel Name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short(name):
    name = re.sub(r"\(.*", "", name)
    return name if len(name) <= 44 else name[:41] + "..."


def opcode(sass):
    """'@!P0 BRA 0x...' -> 'BRA'; warpgroup ops keep their suffix (ARRIVE vs DEPBAR)."""
    m = re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass.strip())
    if not m:
        return sass.strip()
    op = m.group(2)
    return op if op.startswith("WARPGROUP") else op.split(".")[0]


def source_hotspots(path, kernels, top=10):
    """Per kernel named in `kernels` (source page: one block a kernel, SASS lines with ncu's
    sampled warp states): where the samples fall, by stall reason, by opcode and by instruction."""
    text = open(path).read()
    out, seen = [], set()
    for block in re.split(r'\n(?="Kernel Name")', text):
        head, _, body = block.partition("\n")
        name = next(csv.reader([head]))[1] if head.startswith('"Kernel Name"') else ""
        if name not in kernels or name in seen:
            continue
        seen.add(name)
        header, rows = _table(body)
        reasons = [c for c in header if c.startswith("stall_") and "(Not Issued)" not in c]
        total = sum(_num(r[SAMPLES]) for r in rows) or 1.0
        by_reason, by_op = {}, {}
        for r in rows:
            op = opcode(r["Source"])
            by_op[op] = by_op.get(op, 0.0) + _num(r[SAMPLES])
            for c in reasons:
                by_reason[c[6:]] = by_reason.get(c[6:], 0.0) + _num(r[c])
        pct = lambda v: f"{100 * v / total:.1f}%"  # noqa: E731
        out.append(f"{name}: {int(total)} samples over {len(rows)} SASS instructions")
        out.append("  by stall reason: " + ", ".join(f"{k} {pct(v)}" for k, v in
                                                    sorted(by_reason.items(), key=lambda kv: -kv[1])[:8]))
        out.append("  by opcode: " + ", ".join(f"{k} {pct(v)}" for k, v in
                                              sorted(by_op.items(), key=lambda kv: -kv[1])[:8]))
        for r in sorted(rows, key=lambda r: -_num(r[SAMPLES]))[:top]:
            why = max(reasons, key=lambda c: _num(r[c]))
            out.append(f"  {pct(_num(r[SAMPLES])):>6}  {r['Source'].strip()[:64]:64}"
                       f"  mostly {why[6:]}")
    return out


def summarize(work):
    parts = []
    for raw in sorted(glob.glob(os.path.join(work, "*_raw.csv"))):
        name = os.path.basename(raw)[:-len("_raw.csv")]
        if open(raw).read(8).startswith("# ncu rc"):
            parts.append(f"## {name}\n\nno raw page: {open(raw).read()[:300]}")
            continue
        parts.append(f"## {name}\n\n{kernel_table(raw)}")
        src = raw[:-len("_raw.csv")] + "_source.csv"
        if os.path.exists(src) and not open(src).read(8).startswith("# ncu rc"):
            ours = ("paired_attention_fwd", "paired_attention_bwd_dkdv", "paired_attention_bwd_dq")
            hot = source_hotspots(src, ours)
            if hot:
                parts.append("```\n" + "\n".join(hot) + "\n```")
    return "\n\n".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("launch")
    a.add_argument("--variant", choices=("diff_v1", "diff_v2", "vanilla"), required=True)
    a.add_argument("--impl", default="fused")
    a.add_argument("--length", type=int, default=8192)
    a.add_argument("--dim", type=int, default=64)
    a.add_argument("--heads", type=int, default=16)
    a.add_argument("--options", default="", help="fused launch options, e.g. tma=0")
    b = sub.add_parser("profile")
    b.add_argument("--out", required=True)
    b.add_argument("--length", type=int, default=8192)
    b.add_argument("--dim", type=int, default=64)
    b.add_argument("--heads", type=int, default=16, help="DIFF heads (vanilla: heads of 2d)")
    b.add_argument("--commit", default="unknown")
    b.add_argument("--configs", default=",".join(f"{v}:{i}" for v, i in CONFIGS), help="variant:impl,...")
    b.add_argument("--options", default="", help="option sets for the fused runs, '/'-separated")
    c = sub.add_parser("summarize")
    c.add_argument("dir")
    c.add_argument("--out")
    args = p.parse_args()
    if args.cmd == "launch":
        launch(args.variant, args.impl, args.length, args.dim, args.heads, args.options)
    elif args.cmd == "profile":
        configs = [tuple(c.split(":", 1)) for c in args.configs.split(",")]
        profile(args.out, args.length, args.dim, args.heads, args.commit, configs, args.options.split("/"))
    else:
        text = summarize(args.dir)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
