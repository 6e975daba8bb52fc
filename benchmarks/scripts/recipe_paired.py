"""DIFF vs its vanilla twin under two optimizers (issue 33 item 4): the paired delta under AdamW and
under Muon, same model, data, batches and seeds.

    PYTHONPATH=. python benchmarks/scripts/recipe_paired.py --out DIR [--preset stage0] [--seeds 0,1]
        [--steps 600] [--batch-size 16] [--seq-len 1024] [--data builtin:stdlib] [--packing random]
        [--lr 3e-3] [--budget-s 540] [--smoke]

For each seed and optimizer, diffattn.paired.run_paired (one seed per call, so that the budget
can stop between pairs) trains the DIFF model and its vanilla twin from byte-identical shared
init on identical batches (seed s: init seed s and data_seed s), on the cuda backend in bf16
autocast with fused kernels. Writes DIR/recipe_paired.md (optimizer, seed, delta val loss and bpb =
DIFF - vanilla, each arm's bpb, tokens/s and MFU by diffattn.flops; per optimizer the delta over
its seeds with diffattn.stats' 95% intervals, from two seeds on) and DIR/recipe_paired.json, and
every paired run's folder under DIR/runs/. A pair starts only while --budget-s still holds the
longest pair so far; the others are listed as not run, and running the same command again reads
the finished pairs back and runs the rest. --smoke: tiny preset on the CPU in float32, 4 steps (tests this
script).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from diffattn import data as data_mod
from diffattn import paired, stats
from diffattn.backend import load
from diffattn.config import TrainConfig, preset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="stage0")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--optimizers", default="adamw,muon")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--data", default="builtin:stdlib")
    ap.add_argument("--packing", default="random")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.preset, a.steps, a.batch_size, a.seq_len, a.data = "tiny", 4, 2, 32, "builtin:pydoc"
    start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = load("cuda", device="cpu" if a.smoke else "cuda", dtype="float32" if a.smoke else "bfloat16",
                   kernels="composed" if a.smoke else "auto")
    data = data_mod.load(a.data)
    cfg = preset(a.preset, attention="diff", vocab_size=max(256, data.vocab_size), max_seq_len=a.seq_len)
    rows, skipped, longest = [], [], 0.0
    for seed in [int(s) for s in a.seeds.split(",")]:
        for optimizer in a.optimizers.split(","):
            pair_dir = out / "runs" / f"{optimizer}-seed{seed}"
            done = (pair_dir / "paired.json").is_file() and json.loads((pair_dir / "paired.json").read_text())["complete"]
            # a pair not yet run starts only when the budget holds the longest pair so far
            if not done and time.perf_counter() - start + longest > a.budget_s:
                skipped.append(f"{optimizer} seed {seed}")
                continue
            tcfg = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, steps=a.steps, lr=a.lr,
                               warmup_steps=max(1, a.steps // 20), eval_every=max(1, a.steps // 4), eval_batches=8,
                               seed=seed, data_seed=seed, optimizer=optimizer, packing=a.packing)
            t0 = time.perf_counter()
            # resume: a pair finished by an earlier call is read back, a stopped one continues
            r = paired.run_paired(cfg, tcfg, data, backend, pair_dir, seeds=[seed], resume=True,
                                  progress=False)["per_seed"][0]
            if not done:
                longest = max(longest, time.perf_counter() - t0)
            seconds = sum(r[arm]["wall_seconds"] for arm in ("diff", "vanilla"))
            rows.append({"optimizer": optimizer, "seed": seed, "delta": r["delta"], "diff": r["diff"],
                         "vanilla": r["vanilla"], "per_seed": r, "seconds": seconds})
            print(f"{optimizer} seed {seed}: delta val loss {r['delta']['val_loss']:+.4f} nats, "
                  f"{seconds:.0f} s" + (" (an earlier call's)" if done else ""), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = backend.describe().get("device_name", backend.device)
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines = [f"# DIFF vs vanilla under AdamW and Muon ({a.preset}, {device})", "",
             f"- command: `PYTHONPATH=. python benchmarks/scripts/recipe_paired.py {' '.join(argv or sys.argv[1:])}`",
             f"- commit {commit}; {a.steps} steps of {a.batch_size} x {a.seq_len} tokens on {a.data} "
             f"({a.packing} batches), peak lr {a.lr} for both optimizers (Muon's update is scaled to AdamW's "
             "RMS: diffattn/optim.py); seed s = init seed s and data_seed s", "",
             "| optimizer | seed | delta val loss (nats) | delta val bpb | DIFF bpb | vanilla bpb | DIFF tok/s "
             "| vanilla tok/s | DIFF MFU | vanilla MFU | s |", "|" + "---|" * 11]
    for r in rows:
        d, v = r["diff"], r["vanilla"]
        lines.append(f"| {r['optimizer']} | {r['seed']} | {r['delta']['val_loss']:+.4f} | "
                     f"{fmt(r['delta']['val_bpb'], '+.4f')} | {fmt(d['val_bpb'], '.4f')} | {fmt(v['val_bpb'], '.4f')} | "
                     f"{fmt(d['tokens_per_s'], ',.0f')} | {fmt(v['tokens_per_s'], ',.0f')} | {fmt(d['mfu'], '.1%')} | "
                     f"{fmt(v['mfu'], '.1%')} | {r['seconds']:.0f} |")
    for optimizer in a.optimizers.split(","):
        ran = [r["per_seed"] for r in rows if r["optimizer"] == optimizer]
        if ran:
            s = paired.summarize_seeds(ran)
            lines.append(f"- {optimizer}: delta val loss over seeds {stats.interval_text(s['val_loss'])}")
    lines += [f"- not run (time budget): {', '.join(skipped)}"] if skipped else []
    (out / "recipe_paired.md").write_text("\n".join(lines) + "\n")
    (out / "recipe_paired.json").write_text(json.dumps({"commit": commit, "device": device, "args": vars(a),
                                                        "rows": rows, "skipped": skipped}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
