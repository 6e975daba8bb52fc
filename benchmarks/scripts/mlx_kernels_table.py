"""Fused vs composed DIFF V1 attention in MLX on a GPU, and tokens/s of `small` / `stage0` training steps.

    PYTHONPATH=. python benchmarks/scripts/mlx_kernels_table.py [--out DIR] [--quick]

Attention: B*L = 16k tokens, L in {512, 2048, 4096}, head_dim 64 and 128, d_model 2048
(H = 2048 / (2 head_dim) DIFF heads, MHA), bf16, causal. Forward (fwd) and forward+backward
(fwd+bwd: the VJP of all of q, k, v, lambda; fused = the forward kernel then the dq and dkdv
kernels) in ms, the median of timed repeats after warm-up, each repeat ending in mx.eval (which
waits for the GPU). TFLOP/s counts a causal DIFF V1 head as 6 L^2 d forward and 3.5x that
forward+backward (FlashAttention's convention). Errors: the fused bf16 output and gradients of one
batch row and two DIFF heads at each L against the float64 oracle (tests/attention_oracles.py).
Writes mlx_kernels_table.md and .json (the ratios backends/mlx/ops/choice.py's MEASURED holds).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from diffattn.numerics import rel_error

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))  # the oracles


def timeit(fn, repeats, warmup=2):
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def oracle_errors(q, k, v, lam, do):
    """(out, grad) relative errors of the fused bf16 op against float64 on one row, two DIFF heads."""
    import mlx.core as mx

    from attention_oracles import diff_v1_oracle
    from backends.mlx.ops import diff_v1_fused

    q, k, v, do = q[:1, :, :4], k[:1, :, :4], v[:1, :, :2], do[:1, :, :2]
    (out,), grads = mx.vjp(diff_v1_fused, [q, k, v, lam], [do])
    f32 = [np.asarray(t.astype(mx.float32)) for t in (q, k, v, do)]
    ref = diff_v1_oracle(f32[0], f32[1], f32[2], float(lam), f32[3])
    out_err = rel_error(out.astype(mx.float32), ref["out"])
    grad_err = max(rel_error(g.astype(mx.float32), ref[n]) for g, n in zip(grads[:3], "qkv"))
    return out_err, grad_err


def attention_rows(lengths, dims, tokens, repeats):
    import mlx.core as mx

    from backends.mlx.ops import diff_v1_composed, diff_v1_fused

    rows = []
    for d in dims:
        H = 2048 // (2 * d)
        for L in lengths:
            B = max(1, tokens // L)
            rng = np.random.default_rng(0)
            q, k = (mx.array(rng.standard_normal((B, L, 2 * H, d)).astype(np.float32)).astype(mx.bfloat16) for _ in range(2))
            v = mx.array(rng.standard_normal((B, L, H, 2 * d)).astype(np.float32)).astype(mx.bfloat16)
            do = mx.array(rng.standard_normal((B, L, H, 2 * d)).astype(np.float32)).astype(mx.bfloat16)
            lam = mx.array(0.3)
            flops = B * H * 6 * L * L * d
            try:
                out_err, grad_err = oracle_errors(q, k, v, lam, do)
            except (RuntimeError, ValueError) as e:  # a kernel that does not build or fit: say so, go on
                print(f"d={d} L={L}: fused fails: {e}", flush=True)
                rows.append(dict(d=d, L=L, B=B, H=H, error=str(e).splitlines()[0][:200]))
                continue
            row = dict(d=d, L=L, B=B, H=H, out_err=out_err, grad_err=grad_err, flops=flops)
            for name, f in (("fused", diff_v1_fused), ("composed", diff_v1_composed)):
                fwd = timeit(lambda: f(q, k, v, lam), repeats)
                bwd = timeit(lambda: mx.vjp(f, [q, k, v, lam], [do]), repeats)  # output and all grads
                row[name] = (fwd, bwd)
                print(f"d={d} L={L} B={B} H={H} {name:8s} fwd {fwd * 1e3:8.2f} ms ({flops / fwd / 1e12:6.2f} TFLOP/s)"
                      f"  fwd+bwd {bwd * 1e3:8.2f} ms ({3.5 * flops / bwd / 1e12:6.2f} TFLOP/s)"
                      f"  err out {out_err:.1e} grads {grad_err:.1e}",
                      flush=True)
            rows.append(row)
    return rows


def train_row(model, data, steps, row):
    batch, seq = data.shape[1], data.shape[2] - 1
    for i in range(3):
        float(model.train_step(data[i], 1e-3))
    t0 = time.perf_counter()
    for i in range(3, steps + 3):
        loss = model.train_step(data[i], 1e-3)
    final = float(loss)  # waits for the last step
    dt = time.perf_counter() - t0
    row.update(tps=steps * batch * seq / dt, ms=dt / steps * 1e3, loss=final)
    print(f"{row['preset']} {row['attention']:8s} {row['dtype']:9s} {row['kernels']:8s} {row['tps']:10.0f} tokens/s"
          f"  {row['ms']:7.2f} ms/step  loss {final:.4f}", flush=True)
    return row


def training_rows(name, steps, batch, seq, dtypes):
    from diffattn.backend import load
    from diffattn.config import preset
    from diffattn.params import init_params

    rows = []
    for attention in ("diff", "vanilla"):
        cfg = preset(name, attention=attention, max_seq_len=seq)
        params = init_params(cfg, seed=0)
        rng = np.random.default_rng(0)
        data = rng.integers(0, cfg.vocab_size, size=(steps + 3, batch, seq + 1))
        for dtype in dtypes:
            for kernels in (("fused", "composed") if attention == "diff" else ("composed",)):
                try:
                    rows.append(train_row(load("mlx", device="gpu", dtype=dtype, kernels=kernels).build(cfg, params),
                                          data, steps, dict(preset=name, batch=batch, seq=seq, attention=attention,
                                                            dtype=dtype, kernels=kernels)))
                except (RuntimeError, ValueError) as e:
                    print(f"{name} {attention} {dtype} {kernels}: fails: {str(e).splitlines()[0][:200]}", flush=True)
    return rows


def markdown(att, train, meta):
    lines = ["# MLX: fused vs composed DIFF V1 attention, and `small` / `stage0` training steps", "",
             f"- device: {meta['device']}", f"- MLX {meta['mlx']} ({meta['dialect']} dialect of the kernel)",
             f"- commit: {meta['commit']}", f"- command: `{meta['command']}`", "",
             "Attention: bf16, causal, MHA, d_model 2048 (H = 2048/(2 head_dim) DIFF heads), B*L = 16k tokens. "
             "Times in ms (median); TFLOP/s with a DIFF V1 head = 6 L^2 d forward, 3.5x for fwd+bwd. "
             "fwd+bwd of the fused op = the forward kernel, then the dq and dkdv kernels from its log-sum-exp. "
             "err = ||fused - oracle|| / ||oracle|| of the bf16 output (and the worst of dq, dk, dv) against float64, "
             "one batch row and two DIFF heads at that L.", "",
             "| head_dim | L | B | H | fused fwd ms | composed fwd ms | fwd speedup | fused fwd TFLOP/s | fused fwd+bwd ms "
             "| composed fwd+bwd ms | fwd+bwd speedup | fused fwd+bwd TFLOP/s | err out | err grads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in att:
        if "error" in r:
            lines.append(f"| {r['d']} | {r['L']} | {r['B']} | {r['H']} | fused fails: {r['error']} |" + " |" * 9)
            continue
        (ff, fb), (cf, cb) = r["fused"], r["composed"]
        lines.append(f"| {r['d']} | {r['L']} | {r['B']} | {r['H']} | {ff * 1e3:.2f} | {cf * 1e3:.2f} | {cf / ff:.2f}x "
                     f"| {r['flops'] / ff / 1e12:.1f} | {fb * 1e3:.2f} | {cb * 1e3:.2f} | {cb / fb:.2f}x "
                     f"| {3.5 * r['flops'] / fb / 1e12:.1f} | {r['out_err']:.1e} | {r['grad_err']:.1e} |")
    if train:
        lines += ["", f"Training steps (AdamW spec, compiled step), {meta['steps']} timed steps after 3 warm-up steps:", "",
                  "| preset | batch x seq | attention | dtype | kernels | tokens/s | ms/step |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['batch']} x {r['seq']} | {r['attention']} | {r['dtype']} | {r['kernels']} "
                  f"| {r['tps']:.0f} | {r['ms']:.2f} |" for r in train]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    import mlx.core as mx

    from backends.mlx.ops import gpu_dialect
    from backends.mlx.ops.diff_v1 import kernel

    mx.set_default_device(mx.gpu)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    try:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        device = platform.processor() or platform.machine()
    meta = dict(device=device, mlx=mx.__version__, dialect=gpu_dialect(), commit=os.environ.get("COMMIT", commit),
                command="PYTHONPATH=. python benchmarks/scripts/mlx_kernels_table.py" + (" --quick" if args.quick else ""),
                steps=20, fingerprint=kernel.fingerprint())
    if args.quick:
        att = attention_rows([128, 256], [64], 1024, 3)
    else:
        att = attention_rows([512, 2048, 4096], [64, 128], 16384, args.repeats)
    train = [] if args.no_train else (training_rows("small", meta["steps"], 16, 256, ("bfloat16", "float32"))
                                      + training_rows("stage0", meta["steps"], 8, 1024, ("bfloat16",)))
    text = markdown(att, train, meta)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mlx_kernels_table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "mlx_kernels_table.json"), "w") as f:
        json.dump(dict(meta=meta, attention=att, train=train), f, indent=1)


if __name__ == "__main__":
    main()
