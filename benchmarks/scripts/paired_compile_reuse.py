"""Multi-seed paired runs on a GPU: does only the first seed compile? Wall time, tokens/s and the
graphs torch.compile built, per seed and arm, of one `diffattn.paired.run_paired` process.

    PYTHONPATH=. python benchmarks/scripts/paired_compile_reuse.py --out DIR [--preset stage0]
        [--seeds 0-2] [--steps 60] [--data builtin:pydoc]

The cuda backend, bf16, compiled blocks, each step one CUDA graph (the configuration of the GPU
recipes). An arm that compiles nothing new shows 0 new graphs: its models reuse the compiled code
of the arms before it (Dynamo caches on the blocks' code object, guarded on types and shapes).
Writes DIR/paired_compile_reuse.md and .json, and the paired run under DIR/run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffattn import backend as backend_mod
from diffattn import data as data_mod
from diffattn import harness, paired
from diffattn.config import TrainConfig, preset, recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="stage0")
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--data", default="builtin:pydoc")
    args = ap.parse_args()
    import torch
    from torch._dynamo.utils import counters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    be = backend_mod.load("cuda", device="cuda", dtype="bfloat16", compile=True, graphs=True)
    data = data_mod.load(args.data)
    r = recipe(args.preset)
    cfg = preset(args.preset, vocab_size=max(256, data.vocab_size))
    tcfg = TrainConfig(batch_size=r.batch_size, seq_len=r.seq_len, steps=args.steps, lr=r.lr,
                       warmup_steps=args.steps // 10, eval_every=args.steps, eval_batches=4)
    rows = []
    real_run_arm = paired._run_arm

    def timed_arm(label, c, t, *a, **kw):
        graphs0, t0 = counters["stats"]["unique_graphs"], time.time()
        record = real_run_arm(label, c, t, *a, **kw)
        torch.cuda.synchronize()
        s = record["summary"]
        rows.append({"seed": t.seed, "arm": label, "wall_s": time.time() - t0,
                     "new_graphs": counters["stats"]["unique_graphs"] - graphs0, "tokens_per_s": s["tokens_per_s"],
                     "train_s": s["train_seconds"], "val_loss": s["val_loss"]})
        return record

    paired._run_arm = timed_arm
    result = paired.run_paired(cfg, tcfg, data, be, out / "run", seeds=paired.parse_seeds(args.seeds), progress=False)
    lines = [f"# paired runs in one process: {args.preset}, {args.steps} steps of {r.batch_size} x {r.seq_len}, "
             f"seeds {args.seeds}, {args.data}",
             f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, commit {harness.git_commit()}", "",
             "| seed | arm | wall s | new compiled graphs | tokens/s | val loss |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['seed']} | {x['arm']} | {x['wall_s']:.1f} | {x['new_graphs']} | {x['tokens_per_s']:,.0f} | "
              f"{x['val_loss']:.4f} |" for x in rows]
    lines += ["", "delta val loss over seeds: " + paired.stats.interval_text(result["summary"]["val_loss"])]
    (out / "paired_compile_reuse.md").write_text("\n".join(lines) + "\n")
    (out / "paired_compile_reuse.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
