"""`diffattn import`, `diffattn convert` and `diffattn export` (registered by diffattn/cli.py).

    diffattn import HF_DIR --out RUN [--max-seq-len N]
    diffattn convert RUN --to diff|diff_v2 --out RUN2 [--split-heads | --double-heads] [--zero-init]
                     [--mirror-weights] [--sublayer-norm] [--seed S]
    diffattn export RUN --to hf OUT_DIR

Each writes a new folder and refuses one that is not empty; a run folder written here holds one
step-0 checkpoint, which `diffattn train --resume-from RUN` starts a new run from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def add_parsers(sub) -> None:
    i = sub.add_parser("import", help="a local Hugging Face Llama / Mistral / Qwen2 checkpoint -> a run folder")
    i.add_argument("hf_dir", help="folder with config.json and model.safetensors (or shards)")
    i.add_argument("--out", required=True, help="run folder to create")
    i.add_argument("--max-seq-len", type=int, default=None, help="cap the model's max_seq_len")
    i.add_argument("--json", action="store_true")
    c = sub.add_parser("convert", help="a vanilla run -> DIFF V1 or V2 (docs/hf.md)")
    c.add_argument("run", help="run folder (or checkpoint) of a vanilla model")
    c.add_argument("--to", required=True, choices=("diff", "diff_v2"))
    c.add_argument("--out", required=True, help="run folder to create")
    heads = c.add_mutually_exclusive_group()
    heads.add_argument("--split-heads", dest="heads", action="store_const", const="split",
                       help="pairs of heads become one DIFF head (paper layout; changes the function)")
    heads.add_argument("--double-heads", dest="heads", action="store_const", const="double",
                       help="every head gets a new negative map (default)")
    c.add_argument("--zero-init", action="store_true", help="DIFF V1: lambda = 0; V2: lambda_proj = 0")
    c.add_argument("--mirror-weights", action="store_true", help="negative map's q/k rows copy the positive's")
    c.add_argument("--sublayer-norm", action="store_true", help="DIFF V1: keep subln and (1 - lambda_init)")
    c.add_argument("--seed", type=int, default=0, help="seed of the new tensors")
    c.add_argument("--json", action="store_true")
    e = sub.add_parser("export", help="a run -> a Hugging Face checkpoint folder")
    e.add_argument("run")
    e.add_argument("--to", required=True, choices=("hf",))
    e.add_argument("out_dir")
    e.add_argument("--json", action="store_true")


def _report(args, info: dict, line: str) -> int:
    print(line)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    return 0


def cmd_import(args) -> int:
    from diffattn import hf

    cfg, params, notes = hf.read_hf(args.hf_dir, args.max_seq_len)
    ckpt = hf.write_run(args.out, cfg, params, {"kind": "hf-import", "source": str(Path(args.hf_dir).resolve()),
                                                **notes})
    found = hf.copy_tokenizer(Path(args.hf_dir), Path(args.out) / hf.TOKENIZER_DIR)
    info = {"command": "import", "out": args.out, "checkpoint": str(ckpt), "model_config": cfg.__dict__,
            "tokenizer_files": found, **notes}
    return _report(args, info, f"imported {notes['architecture']} ({cfg.num_params():,} params, {cfg.n_layers} "
                               f"layers, {cfg.n_heads} heads / {cfg.kv_heads} kv) -> {args.out}")


def cmd_convert(args) -> int:
    from diffattn import hf
    from diffattn.hf import convert

    cfg, params, manifest = hf.read_run(args.run)
    new, out = convert.to_diff(cfg, params, to=args.to, heads=args.heads or "double", zero_init=args.zero_init,
                               mirror_weights=args.mirror_weights, sublayer_norm=args.sublayer_norm, seed=args.seed)
    origin = {"kind": "convert", "source": str(Path(args.run).resolve()), "to": args.to,
              "heads": args.heads or "double", "zero_init": args.zero_init, "mirror_weights": args.mirror_weights,
              "sublayer_norm": args.sublayer_norm, "seed": args.seed, "from": manifest.get("origin")}
    ckpt = hf.write_run(args.out, new, out, origin)
    tok = hf.tokenizer_of(args.run)
    if tok is not None:
        shutil.copytree(tok, Path(args.out) / hf.TOKENIZER_DIR)
    info = {"command": "convert", "out": args.out, "checkpoint": str(ckpt), "model_config": new.__dict__, **origin}
    return _report(args, info, f"converted to {new.attention} ({new.diff_heads if new.attention == 'diff' else 'v2'} "
                               f"heads, {new.num_params():,} params) -> {args.out}")


def cmd_export(args) -> int:
    from diffattn import hf

    cfg, params, _ = hf.read_run(args.run)
    hf.write_hf(cfg, params, args.out_dir, hf.tokenizer_of(args.run))
    kind = "LlamaForCausalLM" if cfg.attention == "vanilla" else "diffattn (trust_remote_code=True)"
    return _report(args, {"command": "export", "out": args.out_dir, "format": kind},
                   f"exported {cfg.attention} as {kind} -> {args.out_dir}")


COMMANDS = {"import": cmd_import, "convert": cmd_convert, "export": cmd_export}
