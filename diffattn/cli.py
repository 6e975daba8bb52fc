"""The `diffattn` command.

    diffattn train --backend torch|mlx|numpy [--preset tiny] [--attention diff] [--data builtin:pydoc]
                   [--steps N | --tokens N | --minutes M] [--out DIR] [--resume] [--json]
    diffattn paired --backend ... [same options]      DIFF vs its vanilla twin, paired init
    diffattn paired ... --seeds 0-7 [--resume]        one pair of twins per seed, intervals over seeds
    diffattn agree --preset tiny --steps 50           MLX vs PyTorch, CPU float32
    diffattn eval RUN_OR_CKPT [--data ...] [--tokens N] [--position-bins K]   held-out loss of a checkpoint
    diffattn tokenize --data SRC --tokenizer bpe:N --out DIR   token shards for --data DIR
    diffattn conformance ...                          (diffattn.conformance)
    diffattn report ...                               (diffattn.report)
    diffattn generate RUN_OR_CKPT --prompt TEXT ...   stream a continuation (diffattn.generate)
    diffattn probe RUN_OR_PAIRED --task needle|mqar   long-context probes (diffattn.probes)
    diffattn import HF_DIR --out RUN | convert RUN --to diff --out RUN2 | export RUN --to hf DIR
                                                      Hugging Face interop (diffattn/hf, docs/hf.md)

Exit codes: 0 done; 1 a check failed (agree out of tolerance); 2 bad input or an OS error a
user can cause (permissions, a full disk, a folder in use: one line on stderr, nothing written
or the last good checkpoint kept); 3 training diverged (NaN/Inf; the last good checkpoint is kept).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

# What a run uses when no flag says otherwise. The training fields (length, batch, lr, warmup,
# schedule, eval) come from the preset's recipe (diffattn.config.RECIPES); README command one
# (`diffattn train --backend X`) is the tiny recipe on the pydoc prose: the same steps on every
# backend, so the printed val bpb is comparable across them.
DEFAULTS = dict(preset="tiny", attention="diff", data="builtin:pydoc", tokenizer="byte", seed=0, data_seed=0)
RECIPE_FLAGS = ("batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "schedule",
                "eval_every", "optimizer", "packing")
BUDGET_MAX_STEPS = 10 ** 9


class UsageError(ValueError):
    """Bad command-line input (message is one line)."""


def _bad_input_errors():
    from diffattn.backend import BackendError
    from diffattn.config import ConfigError
    from diffattn.data import DataError
    from diffattn.harness import CheckpointError
    from diffattn.hf import HFError
    from diffattn.params import ParamsError

    return (UsageError, ConfigError, DataError, CheckpointError, ParamsError, BackendError, HFError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _run_options(p: argparse.ArgumentParser, backend_required: bool = True) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", required=backend_required,
                   help="torch (PyTorch, CPU or CUDA; also named cuda) | mlx | numpy")
    g.add_argument("--device", default=None, help="cpu | gpu | cuda (backend default if omitted)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float64 (backend default if omitted)")
    g.add_argument("--kernels", default="auto", help="auto (fused where measured faster: docs/kernels.md) | fused | composed | naive")
    g.add_argument("--compile", action="store_true", help="cuda: torch.compile each block")
    g.add_argument("--cuda-graphs", action="store_true", help="cuda: replay each training step as one CUDA graph")
    g.add_argument("--parallel", default=None, choices=("none", "ddp", "fsdp"),
                   help="over the processes torchrun / mlx.launch started: ddp (data parallel; default there) | "
                        "fsdp (cuda: sharded) | none")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help="tiny | small | stage0 | stage1 | stage1-short: a model and "
                   f"its training recipe (default {DEFAULTS['preset']})")
    g.add_argument("--attention", default=None, help="diff | vanilla | diff_v2 (default diff)")
    for flag in ("d-model", "n-layers", "n-heads", "n-kv-heads", "vocab-size"):
        g.add_argument(f"--{flag}", type=int, default=None, help="override the preset")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="builtin:pydoc (default) | builtin:stdlib | builtin:recall | "
                   "builtin:needle | PATH (text file/folder, .bin shards) | hf:NAME[:CONFIG]")
    g.add_argument("--tokenizer", default=None, help="byte (default) | bpe:N (trained locally)")
    g.add_argument("--hf-split", default="train")
    g.add_argument("--hf-column", default="text")
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's recipe)")
    length.add_argument("--tokens", type=float, default=None, help="train on this many tokens")
    length.add_argument("--minutes", type=float, default=None, help="wall-clock budget for training steps")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--seq-len", type=int, default=None)
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr-ratio", type=float, default=None)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--schedule", default=None, help="lr decay after warmup: cosine | linear")
    g.add_argument("--eval-every", type=int, default=None)
    length = g.add_mutually_exclusive_group()
    length.add_argument("--eval-batches", type=int, default=None, help="eval batches of the training shape")
    length.add_argument("--eval-tokens", type=float, default=None, help="eval tokens (default: the recipe's)")
    g.add_argument("--seed", type=int, default=None, help="parameter init seed")
    g.add_argument("--data-seed", type=int, default=None, help="batch order seed")
    _recipe_options(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default runs/<command>-<attention>-<time>)")
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default eval-every)")
    g.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    g.add_argument("--json", action="store_true", help="end with one JSON summary line on stdout")


def _diff_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DIFF warmup and diagnostics")
    g.add_argument("--lambda-warmup", type=int, default=None, metavar="N",
                   help="DIFF: the negative map's weight ramps 0 -> 1 over the first N steps")
    g.add_argument("--diag-every", type=int, default=None, metavar="N",
                   help="every N steps: lambda, map entropies, negative-map norm -> metrics.jsonl")
    g.add_argument("--diag-layers", type=int, default=3, help="how many strided layers to diagnose (default 3)")
    g.add_argument("--diag-log", default="", help="also write diagnostics to tensorboard and/or wandb (offline), "
                   "comma separated")


def _recipe_options(g) -> None:
    from diffattn.config import OPTIMIZERS, PACKINGS

    g.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="adamw | muon: Muon for hidden matrices, AdamW for the rest (diffattn/optim.py); "
                        "default: the preset's recipe (adamw for every preset)")
    g.add_argument("--packing", default=None, choices=PACKINGS,
                   help="random windows of the token stream | bos-best-fit: whole documents packed BOS-aligned, "
                        "the crop fraction printed (diffattn/packing.py); default: the preset's recipe (random)")


def build_parser() -> argparse.ArgumentParser:
    from diffattn.config import RECIPES

    ap = _Parser(prog="diffattn", description="Differential Transformer benchmark suite (MLX / PyTorch).")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train one model; prints val loss and bits per byte")
    _run_options(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--resume-from", default=None, help="start from another run's checkpoint (any backend)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (checkpointed), the schedule still spanning --steps: "
                        "--resume then continues exactly")
    _diff_options(t)
    p = sub.add_parser("paired", help="DIFF vs its vanilla twin from paired init on the same batches")
    _run_options(p)
    p.add_argument("--seeds", default=None, help="seeds to pair, like 0-7 or 0,3,5 (default: --seed); each seed "
                   "drives init and, unless --data-seed is given, the batch order")
    p.add_argument("--resume", dest="continue_paired", action="store_true",
                   help="continue the paired run in --out: finished arms are kept, the others resume from "
                        "their checkpoint (starts the run if --out is new)")
    a = sub.add_parser("agree", help="the same weights and batches on two backends (CPU float32)")
    a.add_argument("--backends", default="mlx,cuda", help="two backends, comma separated (default mlx,cuda)")
    a.add_argument("--preset", default="tiny")
    a.add_argument("--attention", default="diff")
    a.add_argument("--data", default="builtin:pydoc")
    a.add_argument("--steps", type=int, default=50)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--seq-len", type=int, default=64)
    a.add_argument("--lr", type=float, default=RECIPES["tiny"].lr)
    a.add_argument("--warmup-steps", type=int, default=10)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--data-seed", type=int, default=0)
    _recipe_options(a)
    a.add_argument("--json", action="store_true")
    e = sub.add_parser("eval", help="held-out loss, bpb and loss by position of a saved checkpoint (any backend's)")
    e.add_argument("run", help="a run folder (its latest checkpoint), a checkpoints/ folder or a step_XXXXXX folder")
    e.add_argument("--backend", default="cuda", help="numpy | mlx | cuda (default cuda)")
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default=None, help="default: the backend's (float32; numpy float64)")
    e.add_argument("--kernels", default="auto")
    e.add_argument("--data", default=None, help="held-out data, any `train --data` source (default: the run's own)")
    e.add_argument("--tokenizer", default=None, help="default: the run's (its saved tokenizer.json)")
    e.add_argument("--hf-split", default="train")
    e.add_argument("--hf-column", default="text")
    e.add_argument("--tokens", type=float, default=None, help="held-out tokens (default: the run's eval tokens)")
    e.add_argument("--seq-len", type=int, default=None, help="context (default: the run's)")
    e.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    e.add_argument("--position-bins", type=int, default=8, help="equal bins of target position (8)")
    e.add_argument("--task", default="lm", help="lm (default); long-context probes are `diffattn probe`")
    e.add_argument("--out", default=None, help="also write the JSON result to this file")
    e.add_argument("--json", action="store_true", help="end with the JSON result on stdout")
    k = sub.add_parser("tokenize", help="write a corpus as token shards (train.bin, val.bin, tokenizer.json)")
    k.add_argument("--data", default="builtin:pydoc", help="any text source of `train --data`")
    k.add_argument("--tokenizer", default="byte", help="byte | bpe:N (trained on the training split)")
    k.add_argument("--hf-split", default="train")
    k.add_argument("--hf-column", default="text")
    k.add_argument("--out", required=True, help="folder for the shards (must not hold shards yet)")
    k.add_argument("--json", action="store_true")
    sub.add_parser("conformance", help="check a backend against reference-vector files (see its --help)",
                   add_help=False)
    sub.add_parser("report", help="asv results and run logs as tables and plots (see its --help)", add_help=False)
    sub.add_parser("corpus", help="build the offline English corpus from Debian packages (see its --help)",
                   add_help=False)
    sub.add_parser("generate", help="continue a prompt with a trained model, streamed (see its --help)",
                   add_help=False)
    sub.add_parser("probe", help="needle-in-a-haystack / associative-recall probes of trained LMs (see its --help)",
                   add_help=False)
    from diffattn.hf.commands import add_parsers

    add_parsers(sub)
    return ap


# ---- building configs from arguments -------------------------------------------------------

def _pick(args, name):
    v = getattr(args, name, None)
    if v is not None:
        return v
    if name in RECIPE_FLAGS:
        from diffattn.config import recipe

        return getattr(recipe(_pick(args, "preset")), name)
    return DEFAULTS[name]


def _load_data(args, vocab_size=None, tokenizer_file=None):
    from diffattn import data

    return data.load(_pick(args, "data"), _pick(args, "tokenizer"), vocab_size=vocab_size,
                     tokenizer_file=tokenizer_file, hf_split=args.hf_split, hf_column=args.hf_column)


def _model_config(args, data):
    from diffattn.config import preset

    over = {k: getattr(args, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads")
            if getattr(args, k) is not None}
    over["vocab_size"] = args.vocab_size or data.vocab_size
    cfg = preset(_pick(args, "preset"), attention=_pick(args, "attention"))
    seq_len = _pick(args, "seq_len")
    over["max_seq_len"] = max(cfg.max_seq_len, seq_len)
    return preset(_pick(args, "preset"), attention=_pick(args, "attention"), **over)


def _train_config(args):
    """The preset's recipe, each field a flag gives overridden. A shortened run (--steps,
    --tokens) keeps warmup within its first 10% and evaluates at least at its end."""
    from diffattn.config import TrainConfig, recipe

    rec = recipe(_pick(args, "preset"))
    t = {k: _pick(args, k) for k in RECIPE_FLAGS}
    t.update(seed=_pick(args, "seed"), data_seed=_pick(args, "data_seed"))
    t.update(lambda_warmup_steps=getattr(args, "lambda_warmup", None) or 0)
    per_step = t["batch_size"] * t["seq_len"] * t["grad_accum"]
    if args.minutes is not None:
        if not (math.isfinite(args.minutes) and args.minutes > 0):
            raise UsageError(f"--minutes {args.minutes} must be a positive number")
        steps = BUDGET_MAX_STEPS
    elif args.tokens is not None:
        if not (math.isfinite(args.tokens) and args.tokens > 0):
            raise UsageError(f"--tokens {args.tokens:g} must be a positive number")
        steps = math.ceil(args.tokens / per_step)
    elif args.steps is not None:
        steps = args.steps
    else:
        steps = rec.steps if rec.steps is not None else math.ceil(rec.tokens / per_step)
    if args.eval_batches is not None:
        t["eval_batches"] = args.eval_batches
    elif args.eval_tokens is not None:
        if not args.eval_tokens > 0:
            raise UsageError(f"--eval-tokens {args.eval_tokens:g} must be positive")
        t["eval_batches"] = math.ceil(args.eval_tokens / (t["batch_size"] * t["seq_len"]))
    else:
        t["eval_batches"] = rec.eval_batches(t["batch_size"], t["seq_len"])
    t["steps"] = steps
    t["eval_every"] = min(t["eval_every"], steps) if args.eval_every is None else t["eval_every"]
    t["warmup_steps"] = min(t["warmup_steps"], steps // 10) if args.warmup_steps is None else t["warmup_steps"]
    return TrainConfig(**t)


def _default_out(command, attention) -> Path:
    return Path("runs") / f"{command}-{attention}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resume_args(args, source) -> None:
    """Resuming: the run's configs come from its checkpoint manifest; flags given explicitly
    must agree with them (train-config ones are checked against the checkpoint by the harness)."""
    from diffattn import harness

    ckpt = harness.find_checkpoint(source)
    try:
        run = json.loads((ckpt / "manifest.json").read_text())
        if "origin" in run and "train_config" not in run:  # an import / convert: a new run starts from it
            args.model_config, args.init_from = run["model_config"], ckpt
            return
        mc, tc, data_name = run["model_config"], run["train_config"], run["data"]["name"]
    except OSError:
        raise harness.CheckpointError(f"{ckpt}: checkpoint has no readable manifest.json") from None
    except (ValueError, KeyError, TypeError):
        raise harness.CheckpointError(f"{ckpt}/manifest.json: corrupt checkpoint manifest") from None
    for k in ("attention", "d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        given = getattr(args, k, None)
        if given is not None and given != mc.get(k):
            raise harness.CheckpointError(f"--{k.replace('_', '-')} {given} differs from the checkpoint "
                                          f"being resumed ({k}={mc.get(k)!r})")
    if args.preset is not None and run.get("preset") not in (None, args.preset):
        raise harness.CheckpointError(f"--preset {args.preset} differs from the checkpoint being resumed "
                                      f"({run['preset']})")
    fill = dict(data=data_name, tokenizer=run["data"].get("tokenizer") or "byte", preset=run.get("preset"),
                batch_size=tc["batch_size"], seq_len=tc["seq_len"], grad_accum=tc["grad_accum"], lr=tc["lr"],
                min_lr_ratio=tc["min_lr_ratio"], warmup_steps=tc["warmup_steps"], eval_every=tc["eval_every"],
                eval_batches=tc["eval_batches"], seed=tc["seed"], data_seed=tc["data_seed"],
                schedule=tc.get("schedule", "cosine"), lambda_warmup=tc.get("lambda_warmup_steps", 0),
                optimizer=tc.get("optimizer", "adamw"), packing=tc.get("packing", "random"))
    for k, v in fill.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.steps is None and args.tokens is None and args.minutes is None:
        if run.get("budget_s"):
            args.minutes = run["budget_s"] / 60
        else:
            args.steps = tc["steps"]
    args.model_config = mc
    args.tokenizer_file = ckpt.parent.parent / "tokenizer.json"


def _prepare(args, command):
    """Everything a train/paired run needs, validated before anything is written."""
    from diffattn.backend import load
    from diffattn.config import model_config_from

    resume_from = None
    if getattr(args, "resume", False) and getattr(args, "resume_from", None):
        raise UsageError("give --resume (continue --out) or --resume-from PATH, not both")
    if getattr(args, "resume", False):
        if args.out is None:
            raise UsageError("--resume continues the run in --out DIR: give --out")
        resume_from = args.out
    elif getattr(args, "resume_from", None):
        resume_from = args.resume_from
    if resume_from is not None:
        _resume_args(args, resume_from)
        if getattr(args, "init_from", None) is not None:
            resume_from = None  # the checkpoint initializes a new run (its step-0 weights)
    for name in ("batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "steps", "ckpt_every",
                 "stop_after"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {v} must be a positive integer")
    # --compile / --cuda-graphs: the cuda backend's options, passed by name only when asked for
    options = {k: True for k, flag in (("compile", "compile"), ("graphs", "cuda_graphs")) if getattr(args, flag, False)}
    backend = load(args.backend, device=args.device, dtype=args.dtype, kernels=args.kernels,
                   parallel=args.parallel, **options)
    data = _load_data(args, args.vocab_size, getattr(args, "tokenizer_file", None))
    if getattr(args, "model_config", None):
        cfg = model_config_from(args.model_config)
    else:
        cfg = _model_config(args, data)
    tcfg = _train_config(args)
    world = getattr(backend, "world_size", 1)
    if tcfg.batch_size % world:
        raise UsageError(f"--batch-size {tcfg.batch_size} does not split over {world} processes: "
                         f"give a multiple of {world}")
    out = Path(args.out) if args.out else _default_out(command, cfg.attention)
    budget = args.minutes * 60 if args.minutes is not None else None
    return backend, data, cfg, tcfg, out, budget, resume_from


def _fmt(v, spec=".4f"):
    return "n/a" if v is None else format(v, spec)


def _plot_losses(out: Path) -> None:
    """The run's loss curves as out/loss.png (a paired folder: both arms on one plot), and where
    it went; without matplotlib (the bench extra) a line saying so."""
    from diffattn import report

    try:
        path = report.plot_run(out, out / "loss.png")
    except ImportError:
        print("loss plot: not drawn, matplotlib is not installed (pip install -e '.[bench]')")
        return
    print(f"loss plot: {path}")


def cmd_train(args) -> int:
    from diffattn import harness
    from diffattn.backend import describe_short

    backend, data, cfg, tcfg, out, budget, resume_from = _prepare(args, "train")
    writer = getattr(backend, "is_writer", True)  # under --parallel, rank 0 reports
    if not args.no_progress and writer:
        print(f"training {cfg.attention} ({_pick(args, 'preset')}, {cfg.num_params():,} params) on "
              f"{data.name} with {describe_short(backend)} -> {out}", file=sys.stderr)
    init = getattr(args, "init_from", None)
    params = harness.load_checkpoint(init)[0] if init is not None else None
    extra = {"preset": _pick(args, "preset")} if init is None else {"preset": None, "init_from": str(init)}
    s = harness.train(cfg, tcfg, data, backend, out, resume_from=resume_from, budget_s=budget, params=params,
                      ckpt_every=args.ckpt_every, stop_after=args.stop_after, progress=not args.no_progress,
                      extra_manifest=extra, diag_every=args.diag_every, diag_layers=args.diag_layers,
                      diag_log=tuple(n.strip() for n in args.diag_log.split(",") if n.strip()))
    if not writer:
        return 0
    if s["stopped"] == "finished":
        print(f"{out}: the run finished at step {s['steps']}; nothing to do (give a larger --steps to extend it)",
              file=sys.stderr)
    tps = f"{s['tokens_per_s']:,.0f} tok/s" if s["tokens_per_s"] else "n/a tok/s"
    mfu = f"MFU {s['mfu']:.2%} of {s['mfu_peak_flops'] / 1e12:.3g} TFLOP/s ({s['mfu_peak_source']})" if s["mfu"] \
        else "MFU n/a (fewer than two steps timed)"
    line = (f"val bpb {_fmt(s['val_bpb'])} | val loss {_fmt(s['val_loss'])} nats/token | "
            f"{s['steps']} steps, {s['tokens']:,} tokens, {s['train_seconds']:.1f} s, {tps} | {mfu}")
    if s["accuracy"] is not None:
        line += f" | accuracy {s['accuracy']:.4f}"
    if s["crop_fraction"] is not None:
        line += f" | {s['packing']} packing cropped {s['crop_fraction']:.1%} of the training tokens"
    print(line)
    print(f"run folder: {out}")
    _plot_losses(out)
    if args.json:
        summary = {k: v for k, v in s.items() if k != "losses"}
        print(json.dumps({"command": "train", **summary}, sort_keys=True))
    return 0


def cmd_paired(args) -> int:
    from diffattn import paired

    if args.seeds is not None and args.seed is not None:
        raise UsageError("give --seeds (several) or --seed (one), not both")
    seeds = paired.parse_seeds(args.seeds) if args.seeds is not None else [_pick(args, "seed")]
    backend, data, cfg, tcfg, out, budget, _ = _prepare(args, "paired")
    r = paired.run_paired(cfg, tcfg, data, backend, out, seeds=seeds, data_seed=args.data_seed,
                          resume=args.continue_paired, budget_s=budget, progress=not args.no_progress)
    if not getattr(backend, "is_writer", True):  # under --parallel, rank 0 reports
        return 0
    print(paired.format_paired(r))
    print(f"run folder: {out}")
    _plot_losses(out)
    if args.json:
        print(json.dumps({"command": "paired", **r}, sort_keys=True))
    return 0


def cmd_agree(args) -> int:
    from diffattn import paired
    from diffattn.config import TrainConfig, preset
    from diffattn.data import load

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(names) != 2:
        raise UsageError(f"--backends {args.backends!r}: give exactly two, e.g. mlx,cuda")
    data = load(args.data)
    cfg = preset(args.preset, attention=args.attention, vocab_size=max(256, data.vocab_size),
                 max_seq_len=max(args.seq_len, 1))
    tcfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, lr=args.lr,
                       warmup_steps=min(args.warmup_steps, args.steps), seed=args.seed, data_seed=args.data_seed,
                       optimizer=_pick(args, "optimizer"), packing=_pick(args, "packing"))
    r = paired.run_agree(cfg, tcfg, data, names)
    print(paired.format_agree(r))
    if args.json:
        print(json.dumps({"command": "agree", **{k: v for k, v in r.items() if k != "per_step"}}, sort_keys=True))
    return 0 if r["ok"] else 1


def cmd_eval(args) -> int:
    from diffattn import harness
    from diffattn.backend import load
    from diffattn.eval import evaluate_checkpoint
    from diffattn.runfolder import write_json

    ckpt = harness.find_checkpoint(args.run)
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        trained_on = manifest["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise harness.CheckpointError(f"{ckpt}: unreadable checkpoint manifest") from None
    if args.data is None:
        args.data = trained_on["name"]
        args.tokenizer = args.tokenizer or trained_on.get("tokenizer") or "byte"
    for name in ("seq_len", "batch_size"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {v} must be a positive integer")
    backend = load(args.backend, device=args.device, dtype=args.dtype, kernels=args.kernels)
    tokenizer_file = ckpt.parent.parent / "tokenizer.json"  # the run's own BPE, where it trained one
    data = _load_data(args, manifest["model_config"]["vocab_size"], tokenizer_file)
    r = evaluate_checkpoint(ckpt, backend, data, tokens=args.tokens, seq_len=args.seq_len,
                            batch_size=args.batch_size, n_bins=args.position_bins, task=args.task)
    if "val_loss" in r:
        print(f"val loss {r['val_loss']:.6f} nats/token | val bpb {_fmt(r['val_bpb'])} | {r['tokens']:,} tokens of "
              f"{r['data']} at context {r['seq_len']} | {r['attention']} step {r['step']} ({r['backend']['backend']}, "
              f"{r['backend']['dtype']})")
        for (lo, hi), v in zip(r["position_bins"], r["loss_by_position"]):
            print(f"  loss @ pos {lo}-{hi - 1}: {v:.4f}")
    if args.out:
        write_json(Path(args.out), r)
    if args.json:
        print(json.dumps({"command": "eval", **r}, sort_keys=True))
    return 0


def cmd_tokenize(args) -> int:
    from diffattn import data
    from diffattn.runfolder import write_json

    out = Path(args.out)
    if out.exists() and any(out.glob("*.bin")):
        raise UsageError(f"--out {out}: already holds token shards; choose another folder")
    d = data.load(args.data, args.tokenizer, hf_split=args.hf_split, hf_column=args.hf_column)
    if d.task != "lm":
        raise UsageError(f"{args.data} is a synthetic task, generated per step: nothing to tokenize")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tokenizer.json", d.tokenizer.to_json())
    for split, streams in (("train", d.train), ("val", d.val)):
        data.write_shard(out / f"{split}.bin", np.concatenate(streams), vocab_size=d.vocab_size)
    info = {"command": "tokenize", "out": str(out), "tokenizer": d.tokenizer.name, "vocab_size": d.vocab_size,
            "train_tokens": int(sum(map(len, d.train))), "val_tokens": int(sum(map(len, d.val)))}
    print(f"wrote {out}/train.bin ({info['train_tokens']:,} tokens), {out}/val.bin ({info['val_tokens']:,} tokens) "
          f"and tokenizer.json ({info['tokenizer']})")
    if args.json:
        print(json.dumps(info, sort_keys=True))
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"diffattn: {module} is not available ({e})", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("conformance", "report", "corpus", "generate", "probe"):
        return _delegate(f"diffattn.{'probes' if argv[0] == 'probe' else argv[0]}", argv[1:])
    args = build_parser().parse_args(argv)
    from diffattn.harness import Diverged

    bad_input = _bad_input_errors()
    try:
        from diffattn.hf.commands import COMMANDS

        commands = {"train": cmd_train, "paired": cmd_paired, "agree": cmd_agree, "eval": cmd_eval,
                    "tokenize": cmd_tokenize, **COMMANDS}
        return commands[args.command](args)
    except bad_input as e:
        print(f"diffattn {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"diffattn {args.command}: diverged: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # permissions, a full disk, a file where a folder should be, ...
        from diffattn.runfolder import describe_os_error

        print(f"diffattn {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
