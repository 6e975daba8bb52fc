"""Fused vs composed DIFF V1 attention in MLX on a GPU, and tokens/s of a `small` training step.

    PYTHONPATH=. python benchmarks/scripts/mlx_kernels_table.py [--out DIR] [--quick]

Attention: B*L = 16k tokens, L in {512, 2048, 4096}, head_dim 64 and 128, d_model 2048
(H = 2048 / (2 head_dim) DIFF heads, MHA), bf16, causal. Forward (fwd) and forward+backward
(fwd+bwd: the VJP of all of q, k, v, lambda) in ms, the median of timed repeats after warm-up,
each repeat ending in mx.eval (which waits for the GPU). TFLOP/s counts a causal DIFF V1 head
as 6 L^2 d forward and 3.5x that forward+backward (FlashAttention's convention). Before timing,
the fused output is checked against the composed one at each shape.
"""
import argparse
import os
import platform
import subprocess
import time

import numpy as np

from diffattn.numerics import rel_error


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
            ref = diff_v1_composed(q, k, v, lam).astype(mx.float32)
            out = diff_v1_fused(q, k, v, lam).astype(mx.float32)
            err = rel_error(out, ref)
            flops = B * H * 6 * L * L * d
            row = dict(d=d, L=L, B=B, H=H, check=err)
            for name, f in (("fused", diff_v1_fused), ("composed", diff_v1_composed)):
                fwd = timeit(lambda: f(q, k, v, lam), repeats)
                bwd = timeit(lambda: mx.vjp(f, [q, k, v, lam], [do]), repeats)  # output and all grads
                row[name] = (fwd, bwd)
                print(f"d={d} L={L} B={B} H={H} {name:8s} fwd {fwd * 1e3:8.2f} ms ({flops / fwd / 1e12:6.2f} TFLOP/s)"
                      f"  fwd+bwd {bwd * 1e3:8.2f} ms ({3.5 * flops / bwd / 1e12:6.2f} TFLOP/s)  rel.err {err:.1e}",
                      flush=True)
            row["flops"] = flops
            rows.append(row)
            del q, k, v, do, ref, out
    return rows


def training_rows(steps, batch, seq):
    import mlx.core as mx

    from diffattn.backend import load
    from diffattn.config import preset
    from diffattn.params import init_params

    rows = []
    for attention in ("diff", "vanilla"):
        cfg = preset("small", attention=attention, max_seq_len=seq)
        params = init_params(cfg, seed=0)
        rng = np.random.default_rng(0)
        data = rng.integers(0, cfg.vocab_size, size=(steps + 3, batch, seq + 1))
        for dtype in ("bfloat16", "float32"):
            for kernels in (("fused", "composed") if attention == "diff" else ("composed",)):
                model = load("mlx", device="gpu", dtype=dtype, kernels=kernels).build(cfg, params)
                for i in range(3):
                    float(model.train_step(data[i], 1e-3))
                t0 = time.perf_counter()
                for i in range(3, steps + 3):
                    loss = model.train_step(data[i], 1e-3)
                final = float(loss)  # waits for the last step
                dt = time.perf_counter() - t0
                tps = steps * batch * seq / dt
                rows.append(dict(attention=attention, dtype=dtype, kernels=kernels, tps=tps, ms=dt / steps * 1e3, loss=final))
                print(f"small {attention:8s} {dtype:9s} {kernels:8s} {tps:10.0f} tokens/s  {dt / steps * 1e3:7.2f} ms/step"
                      f"  loss {final:.4f}", flush=True)
    return rows


def markdown(att, train, meta):
    lines = [f"# MLX: fused vs composed DIFF V1 attention, and a `small` training step", "",
             f"- device: {meta['device']}", f"- MLX {meta['mlx']} ({meta['dialect']} dialect of the kernel)",
             f"- commit: {meta['commit']}", f"- command: `{meta['command']}`", "",
             "Attention: bf16, causal, MHA, d_model 2048 (H = 2048/(2 head_dim) DIFF heads), B*L = 16k tokens. "
             "Times in ms (median); TFLOP/s with a DIFF V1 head = 6 L^2 d forward, 3.5x for fwd+bwd. "
             "fwd+bwd of the fused op = fused forward + backward by recompute through the composed path. "
             "rel.err = ||fused - composed|| / ||composed|| of the bf16 outputs.", "",
             "| head_dim | L | B | H | fused fwd ms | composed fwd ms | fwd speedup | fused fwd TFLOP/s | fused fwd+bwd ms "
             "| composed fwd+bwd ms | fwd+bwd speedup | rel.err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in att:
        (ff, fb), (cf, cb) = r["fused"], r["composed"]
        lines.append(f"| {r['d']} | {r['L']} | {r['B']} | {r['H']} | {ff * 1e3:.2f} | {cf * 1e3:.2f} | {cf / ff:.2f}x "
                     f"| {r['flops'] / ff / 1e12:.1f} | {fb * 1e3:.2f} | {cb * 1e3:.2f} | {cb / fb:.2f}x | {r['check']:.1e} |")
    if train:
        lines += ["", f"Training step of the `small` preset (AdamW spec, compiled step), batch {meta['batch']} x "
                  f"{meta['seq']} tokens, {meta['steps']} timed steps after 3 warm-up steps:", "",
                  "| attention | dtype | kernels | tokens/s | ms/step |", "|---|---|---|---|---|"]
        lines += [f"| {r['attention']} | {r['dtype']} | {r['kernels']} | {r['tps']:.0f} | {r['ms']:.2f} |" for r in train]
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
                batch=16, seq=256, steps=20)
    if args.quick:
        att = attention_rows([128, 256], [64], 1024, 3)
    else:
        att = attention_rows([512, 2048, 4096], [64, 128], 16384, args.repeats)
    train = [] if args.no_train else training_rows(meta["steps"], meta["batch"], meta["seq"])
    text = markdown(att, train, meta)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mlx_kernels_table.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
