"""Prefill and decode tokens/s of the twins on a GPU, beside the memory-bandwidth bound and beside
Hugging Face transformers' generate of a same-size Llama (issue 27 item 2).

    PYTHONPATH=. python benchmarks/scripts/decode_table.py --out "$OUT"
    PYTHONPATH=. python benchmarks/scripts/decode_table.py --smoke --out DIR   (tiny, CPU: tests this script)

Each row: one variant of the preset (stage1: d 1024, 13 layers; random weights, paired init), a
batch of B random prompts of --prompt tokens, then --new tokens greedy, bf16 weights and cache.

  prefill tok/s   B * prompt / the time of the backend's prefill (eager; the model's attention op)
  step tok/s      B / the time of one decode step: backends/cuda/decode.py's step, each layer
                  torch.compile'd and the whole step replayed as one CUDA graph, the next token
                  the argmax taken on the GPU (no host round trip): --new - 1 steps timed after
                  warm-up (compilation, the graph's recording)
  generate tok/s  diffattn.generate over the Backend protocol, end to end (prefill included):
                  B * new / its time; logits go to numpy and the token is sampled there (greedy)
                  at every step, so each step waits for the host
  bound tok/s     B * HBM bandwidth / the bytes a step must read (diffattn.decode.bytes_per_step:
                  every weight once, bf16, plus the cache of B rows at the mean context
                  prompt + new/2). Our step reads the whole static cache (prompt + new positions,
                  masked), so its own floor is a little higher than this bound at large B.
                  Bandwidth by device name: H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8 (datasheets).
  HF              transformers' LlamaForCausalLM built from a config of the vanilla twin's sizes
                  (random weights, no download; sdpa attention, bf16), eager, greedy,
                  max_new_tokens = new, no early stop: generate tok/s = B * new / generate's time
                  (end to end, as ours), and step tok/s = B * (new - 1) / (generate's time - the
                  time of one forward of the prompt with its cache), its decode steps alone.

Timing: torch.cuda.synchronize() around each timed span, wall clock, best of --repeats.
Writes decode_table.md and decode_table.json under --out. n/a: not measured (a row not reached
within --budget-s, a device whose bandwidth is not in the table) - never a made-up number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffattn import decode
from backends.cuda import create
from diffattn.config import preset
from diffattn.generate import generate
from diffattn.params import init_params

HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))  # first match wins


def hbm_bandwidth(device_name: str) -> float | None:
    for key, bw in HBM_BYTES_PER_S:
        if key.lower() in device_name.lower():
            return bw
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls of fn (synchronized), and fn's last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def build(cfg, device, options):
    return create(device=device.type, **options).build(cfg, init_params(cfg, seed=0))


def ours(model, batch, prompt_len, new, device, repeats):
    """prefill, step and generate tokens/s of one built model at one batch size."""
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (batch, prompt_len))
    max_len = prompt_len + new
    t_prefill, _ = timed(lambda: model.prefill(prompt, max_len), device, repeats)
    dec = model.decoder

    def steps(n):
        tok = dec.prefill(torch.from_numpy(prompt).to(device), max_len)[:, -1].argmax(-1)
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            tok = dec.step(tok).argmax(-1)
        sync(device)
        return time.perf_counter() - t

    steps(min(4, new - 1))  # compile, record the graph
    t_steps = min(steps(new - 1) for _ in range(repeats))
    t_gen, _ = timed(lambda: generate(model, prompt, new), device, repeats)
    return {"prefill_tok_s": batch * prompt_len / t_prefill,
            "step_tok_s": batch * (new - 1) / t_steps,
            "generate_tok_s": batch * new / t_gen,
            "step_ms": 1e3 * t_steps / (new - 1), "cache_bytes_per_token": dec.bytes_per_token()}


def hf_llama(cfg, batch, prompt_len, new, device, dtype, repeats):
    """transformers' eager generate of a Llama with the vanilla twin's sizes (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(hc).to(dtype).eval()
    model.generation_config.eos_token_id = None
    params = sum(p.numel() for p in model.parameters())
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t_prefill, _ = timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True), device, repeats)
        gen = lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,  # noqa: E731
                                     min_new_tokens=new, do_sample=False, pad_token_id=0)
        gen()  # warm-up
        t_gen, out = timed(gen, device, repeats)
    assert out.shape[1] == prompt_len + new, out.shape
    decode_s = t_gen - t_prefill
    return {"params": params, "prefill_tok_s": batch * prompt_len / t_prefill, "generate_tok_s": batch * new / t_gen,
            "step_tok_s": batch * (new - 1) / decode_s if decode_s > 0 else None}


def fmt(v, spec=",.0f"):
    return "n/a" if v is None else format(v, spec)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--preset", default="stage1")
    ap.add_argument("--variants", default="vanilla,diff,diff_v2")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting rows after this long")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="eager decode step (still one CUDA graph)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, float32, eager (tests the script)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.smoke:
        args.preset, args.prompt, args.new, args.repeats = "tiny", 8, 4, 1
        device, options, dtype, cache_dtype = torch.device("cpu"), dict(dtype="float32", kernels="composed"), \
            torch.float32, "float32"
    else:
        if not torch.cuda.is_available():
            print("decode_table: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, cache_dtype = torch.device("cuda"), torch.bfloat16, "bfloat16"
        options = dict(dtype="bfloat16", kernels="auto", compile=not args.no_compile, graphs=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw = hbm_bandwidth(name)
    batches = [int(b) for b in args.batches.split(",")]
    base = preset(args.preset)
    rows = []
    for variant in args.variants.split(","):
        cfg, model = base.twin(variant), None
        for b in batches:
            row = {"variant": variant, "batch": b, "params": cfg.num_params()}
            if time.time() - t0 < args.budget_s:
                try:
                    model = model or build(cfg, device, options)  # one model (and compiled step) per variant
                    row.update(ours(model, b, args.prompt, args.new, device, args.repeats))
                except Exception as e:  # recorded and shown, never a number; the other rows still run
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                steps_bytes = decode.bytes_per_step(cfg, b, args.prompt + args.new // 2, cache_dtype)
                row["bytes_per_step"] = steps_bytes
                row["bound_tok_s"] = b * bw / steps_bytes if bw else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hf = {}
    if not args.no_hf:
        for b in batches:
            if time.time() - t0 < args.budget_s:
                try:
                    hf[b] = hf_llama(base.twin("vanilla"), b, args.prompt, args.new, device, dtype, args.repeats)
                except Exception as e:
                    print(f"HF batch {b}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
                    continue
                print(json.dumps({"hf_batch": b, **hf[b]}), flush=True)
    van = {r["batch"]: r.get("step_tok_s") for r in rows if r["variant"] == "vanilla"}
    lines = [f"# Decode tokens/s: {args.preset} twins, prompt {args.prompt}, {args.new} new tokens, greedy",
             "", f"device {name}; HBM bandwidth {fmt(bw and bw / 1e12, '.2f')} TB/s; commit {commit()}; "
             f"torch {torch.__version__}; options {options}", "",
             f"command: `PYTHONPATH=. python benchmarks/scripts/decode_table.py {' '.join(argv or sys.argv[1:])}`", "",
             "| variant | batch | params | cache B/token | prefill tok/s | step tok/s | step ms | generate tok/s "
             "| bound tok/s | step % of bound | step x HF step | generate x HF generate | step / vanilla |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratio = lambda a, b, spec=".2f": fmt(a / b if a and b else None, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['params']:,} | error: {r['error']} |")
            continue
        s, bound, h = r.get("step_tok_s"), r.get("bound_tok_s"), hf.get(r["batch"], {})
        lines.append(f"| {r['variant']} | {r['batch']} | {r['params']:,} | {fmt(r.get('cache_bytes_per_token'))} "
                     f"| {fmt(r.get('prefill_tok_s'))} | {fmt(s)} | {fmt(r.get('step_ms'), '.3f')} "
                     f"| {fmt(r.get('generate_tok_s'))} | {fmt(bound)} | {ratio(s and 100 * s, bound, '.1f')} "
                     f"| {ratio(s, h.get('step_tok_s'))} | {ratio(r.get('generate_tok_s'), h.get('generate_tok_s'))} "
                     f"| {ratio(s, van.get(r['batch']), '.3f')} |")
    for b, h in hf.items():
        lines.append(f"| HF Llama (eager generate) | {b} | {h['params']:,} | | {fmt(h['prefill_tok_s'])} "
                     f"| {fmt(h['step_tok_s'])} | | {fmt(h['generate_tok_s'])} | | | 1.00 | 1.00 | |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_table.md").write_text("\n".join(lines) + "\n")
    (out / "decode_table.json").write_text(json.dumps({"device": name, "bandwidth": bw, "commit": commit(),
                                                       "args": vars(args), "rows": rows,
                                                       "hf": {str(k): v for k, v in hf.items()}}, indent=1))
    print("\n".join(lines))
    print(f"wrote {out}/decode_table.md and decode_table.json in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
