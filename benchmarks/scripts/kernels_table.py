"""The DIFF attention kernel table: fused (Triton) vs composed (SDPA) vs naive, forward and
forward+backward, for DIFF V1 and V2 (issue 4 item 5, issue 7).

    PYTHONPATH=. python benchmarks/scripts/kernels_table.py --out DIR [--commit HASH]

Sizes: B * L = 16384 tokens, L in 1k..16k, 16 output heads (DIFF heads) of head_dim d in {64, 128};
V1: q 32 sub-heads of d, k 32 of d, v 16 heads of 2d (MHA); V2: q 32 heads of d, k/v 16 heads of d.
bfloat16, causal. Timing: triton.testing.do_bench, median. FLOPs (causal, FlashAttention's
convention): forward per DIFF V1 head 2 maps x (2 N^2 d + 2 N^2 (2d)) / 2 = 6 N^2 d, per V2 output
head 2 query heads x (2 N^2 d + 2 N^2 d) / 2 = 4 N^2 d; backward 2.5x forward, so fwd+bwd 3.5x.
Error: max over the output (and, for fwd+bwd, the gradients of q, k, v) of ||x - ref|| / ||ref||,
ref the composed path in float32 (memory-efficient SDPA, IEEE float32) on the same (bf16-valued)
inputs; lambda's gradient separately (err dlam). Peak memory:
torch.cuda.max_memory_allocated during the call minus what was allocated before it (inputs).
Composed is timed with each SDPA backend that accepts the shapes, and under torch.compile with
cuDNN's (`composed:cudnn+compile`: Inductor fuses the combine, and subln, forward and backward);
"best composed" is the fastest of them. `cudnn-calls-only` times cuDNN's attention calls of the
composed path alone (no combine, no subln: not the op, so no error column, and no candidate for best
composed): in the forward, the fused row's ratio to it is the kernel's rate per FLOP against
cuDNN's, which bounds target 1 once Inductor has fused the composed path's combine (sdpa_calls).
Each fused and composed call is timed twice: by CUDA events around eager calls (do_bench: host and
GPU together, L2 flushed between calls; short calls time the host, docs/kernels.md) and by replaying
a CUDA graph of repeated calls (do_bench_cudagraph: GPU time alone, L2 warm). TFLOP/s and the
targets use the graph time where there is one.
--subln: V1 as the model calls it and as issue 7's target 1 defines the composed path, with the
output's RMSNorm (subln): every V1 implementation gets norm=(weight, eps), which the fused kernels
apply in their epilogue and the composed / naive paths as one more kernel after the combine.
--smoke runs a tiny version on CPU through the Triton interpreter (host timer) to test this script.
"""
import argparse
import contextlib
import functools
import json
import os
import sys
import time

import torch

from benchmarks import _common
from diffattn.config import ModelConfig
from diffattn.numerics import rel_error as rel
from backends.cuda.ops import diff_v1_attention, diff_v2_attention

TOKENS, HEADS = 16384, 16
LENGTHS = (1024, 2048, 4096, 8192, 16384)
SUBLN_EPS = ModelConfig().norm_eps  # the model's subln eps: the config's norm_eps (its default)
OPS = {"diff_v1": diff_v1_attention, "diff_v2": diff_v2_attention}


def flops(variant, B, L, d, mode):
    per_head = (6 if variant == "diff_v1" else 4) * L * L * d
    return B * HEADS * per_head * (3.5 if mode == "fwd+bwd" else 1.0)


def make_inputs(variant, B, L, d, device, seed, subln=False):
    """Float32 inputs and dO; lam a V1 scalar / V2 sigmoid'd per-token values; with subln, V1's
    norm weight (subln_w, 2d wide)."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    H = HEADS
    if variant == "diff_v1":
        x = dict(q=randn(B, L, 2 * H, d), k=randn(B, L, 2 * H, d), v=randn(B, L, H, 2 * d),
                 lam=torch.tensor(0.6, device=device))
        if subln:
            x["subln_w"] = torch.rand(2 * d, generator=g, device=device) + 0.5
        return x, randn(B, L, H, 2 * d)
    x = dict(q=randn(B, L, 2 * H, d), k=randn(B, L, H, d), v=randn(B, L, H, d),
             lam=torch.sigmoid(randn(B, L, H)))
    return x, randn(B, L, H, d)


def call(op, x, impl, options=None):
    """op on the inputs x (the fused kernels launched with options, KernelOptions or None for the
    defaults); V1's subln weight, where x carries one, as the op's norm."""
    x = dict(x)
    w = x.pop("subln_w", None)
    kw = {"options": options} if impl == "fused" and options is not None else {}
    return op(**x, impl=impl, **kw) if w is None else op(**x, impl=impl, norm=(w, SUBLN_EPS), **kw)


def float32_input(variant, name):
    """V1's lambda and norm weight are float32 parameters in the model; everything else is cast."""
    return variant == "diff_v1" and name in ("lam", "subln_w")


def impls(variant, device, options=None):
    """name -> fn(**inputs) for every implementation to time, the fused kernels under options."""
    op = OPS[variant]
    out = {"fused": lambda **x: call(op, x, "fused", options), "naive": lambda **x: call(op, x, "naive")}
    if device != "cuda":
        out["composed"] = lambda **x: call(op, x, "composed")
        out["composed+compile"] = compiled_composed(variant)
        out["sdpa-calls-only"] = sdpa_calls(variant)
        return out

    def composed(backend, fn=lambda **x: call(op, x, "composed")):
        def with_backend(**x):
            with _sdpa_backend(x["q"].device, backend):
                return fn(**x)
        return with_backend
    # every SDPA backend is tried; one that refuses the shapes (flash: V1's v head dim 2d; grouped
    # heads for V2 on some backends) gets a row saying so
    for backend in ("cudnn", "efficient", "flash"):
        out[f"composed:{backend}"] = composed(backend)
    # the composed path at its best: Inductor fuses the combine (and subln) around cuDNN's calls,
    # forward and backward, where eager runs them as a chain of elementwise kernels
    out["composed:cudnn+compile"] = composed("cudnn", compiled_composed(variant))
    out["cudnn-calls-only"] = composed("cudnn", sdpa_calls(variant))
    return out


def sdpa_calls(variant):
    """The composed path's attention calls alone, eager, on the same q / k views, their outputs as
    SDPA gives them: no combine, no subln, so not the op. Forward: what the op's attention FLOPs cost
    at cuDNN's own rate, so the fused row's ratio to it is the kernel's rate per FLOP against cuDNN's.
    Forward+backward: autograd also scatters the q / k slices' gradients into whole tensors (eager
    copies the compiled path fuses), so there it is no floor."""
    from backends.cuda.ops.diff_v1 import composed as v1
    from backends.cuda.ops.diff_v2 import composed as v2

    def calls(q, k, v, **_):
        return v1.maps(q, k, v) if variant == "diff_v1" else (v2.maps(q, k, v),)
    return calls


@functools.cache
def compiled_composed(variant):
    """One torch.compile'd composed op per variant, made once. Dynamo caches per code object, which
    both variants' lambdas share: every length, mode and variant adds guards to the same entry
    rather than compiling anew, and dims that change become dynamic, V2's head counts too once V1
    ran (vanilla.composed.sdpa decides GQA by a branch for that). Made on first use, after main()
    has set TRITON_INTERPRET (torch.compile's imports would otherwise fix Triton's mode first)."""
    op = OPS[variant]
    return torch.compile(lambda **x: call(op, x, "composed"))


def reference(variant, x, do):
    """Float32 composed output and gradients (memory-efficient SDPA: IEEE float32, no tf32). That
    kernel takes no grouped heads, so V2's k/v heads are repeated for it (inside autograd)."""
    from backends.cuda.ops.vanilla.composed import sdpa
    x = {n: t.detach().float().requires_grad_(True) for n, t in x.items()}
    with _sdpa_backend(x["q"].device, "efficient"):
        if variant == "diff_v1":
            out = call(diff_v1_attention, x, "composed")
        else:
            group = x["q"].shape[2] // x["k"].shape[2]
            a = sdpa(x["q"], *(x[n].repeat_interleave(group, dim=2) for n in ("k", "v")))
            out = (a[:, 0::2] - x["lam"].transpose(1, 2)[..., None] * a[:, 1::2]).transpose(1, 2)
    out.backward(do)
    return {"out": out.detach(), **{n: t.grad for n, t in x.items()}}


def _sdpa_backend(device, name):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "flash": SDPBackend.FLASH_ATTENTION}[name]])


def bench(fn, grad_to_none):
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_graph(fn, grad_to_none):
    """GPU time alone: median over replays of a CUDA graph of repeated calls (no host work, and
    unlike do_bench no L2 flush between calls)."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=50, grad_to_none=grad_to_none, return_mode="median")


def measure(fn, variant, x32, do32, dtype, mode, ref, graph=False):
    """-> dict(ms, err, peak_mib) for one implementation, with graph=True also graph_ms (or
    graph_note, why the calls could not be captured); raises on OOM / no kernel."""
    x = {n: (t if float32_input(variant, n) else t.to(dtype)).detach().requires_grad_(mode == "fwd+bwd")
         for n, t in x32.items()}
    do = do32.to(dtype)
    leaves = list(x.values())
    cuda = x["q"].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        out = fn(**x)
    calls_only = isinstance(out, tuple)  # sdpa_calls' outputs are not the op's: no error against the reference
    douts = [torch.randn_like(o) for o in out] if calls_only else [do]
    if mode == "fwd+bwd":
        torch.autograd.backward(list(out) if calls_only else [out], douts)
    errs = {}
    if not calls_only:
        grads = [n for n in ("q", "k", "v", "subln_w") if n in x] if mode == "fwd+bwd" else []
        errs["err"] = max([rel(out.detach(), ref["out"])] + [rel(x[n].grad, ref[n]) for n in grads])
        if mode == "fwd+bwd":
            errs["err_dlam"] = rel(x["lam"].grad, ref["lam"])
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else float("nan")
    del out
    for t in leaves:
        t.grad = None

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(**x)
        else:
            out = fn(**x)
            torch.autograd.backward(list(out) if calls_only else [out], douts)
    ms = bench(step, leaves if mode == "fwd+bwd" else None)
    timed = dict(ms=ms)
    if graph:
        try:
            timed["graph_ms"] = bench_graph(step, leaves if mode == "fwd+bwd" else None)
        except Exception as e:  # a path CUDA graphs cannot capture: said in the row
            timed["graph_note"] = f"graph: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]}"
    return dict(**timed, peak_mib=peak, **errs)


def run(variants, dims, lengths, modes, device, dtype, log, subln=False, options=None):
    rows = []
    for variant in variants:
        for d in dims:
            for L in lengths:
                B = max(1, TOKENS // L)
                x32, do32 = make_inputs(variant, B, L, d, device, seed=L + d, subln=subln)
                # the reference sees the very values the timed dtype holds (V1's lambda and norm weight stay float32)
                x32 = {n: t if float32_input(variant, n) else t.to(dtype).float() for n, t in x32.items()}
                do32 = do32.to(dtype).float()
                ref = reference(variant, x32, do32)
                for mode in modes:
                    for name, fn in impls(variant, device, options).items():
                        row = dict(variant=variant, d=d, L=L, B=B, mode=mode, impl=name)
                        try:
                            # naive is timed by events only: its L x L tensors make graph capture costly
                            graph = device == "cuda" and name != "naive"
                            row.update(measure(fn, variant, x32, do32, dtype, mode, ref, graph))
                            row["tflops"] = flops(variant, B, L, d, mode) / row.get("graph_ms", row["ms"]) / 1e9
                            row.update(_common.gpu_clocks())  # the JSON's rows: the clock each was timed at
                        except torch.cuda.OutOfMemoryError:
                            row["note"] = "OOM"
                        except Exception as e:  # an SDPA backend that refuses these shapes, a compile error
                            row["note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
                        log(row)
                del x32, do32, ref
    return rows


def add_ratios(rows):
    """ratio = best composed ms / this ms, per (variant, d, L, mode): vs_best_composed from the
    event timings, graph_vs_best_composed from the graph replays."""
    for key, prefix in (("ms", ""), ("graph_ms", "graph_")):
        best = {}
        for r in rows:
            if r["impl"].startswith("composed") and key in r:
                k = (r["variant"], r["d"], r["L"], r["mode"])
                if k not in best or r[key] < best[k][0]:
                    best[k] = (r[key], r["impl"])
        for r in rows:
            k = (r["variant"], r["d"], r["L"], r["mode"])
            if key in r and k in best:
                r[prefix + "vs_best_composed"] = best[k][0] / r[key]
                r[prefix + "best_composed"] = best[k][1]


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def markdown(rows):
    lines = ["| variant | d | L | B | mode | impl | ms (events) | ms (graph) | TFLOP/s | x best composed (events) | "
             "x best composed (graph) | max rel err | err dlam | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "; ".join(n for n in (r.get("note"), r.get("graph_note")) if n)
        lines.append(f"| {r['variant']} | {r['d']} | {r['L']} | {r['B']} | {r['mode']} | {r['impl']} | "
                     f"{fmt(r.get('ms'), '.3f')} | {fmt(r.get('graph_ms'), '.3f')} | {fmt(r.get('tflops'), '.1f')} | "
                     f"{fmt(r.get('vs_best_composed'), '.2f')} | {fmt(r.get('graph_vs_best_composed'), '.2f')} | "
                     f"{fmt(r.get('err'), '.1e')} | {fmt(r.get('err_dlam'), '.1e')} | {fmt(r.get('peak_mib'), '.0f')} | "
                     f"{note} |")
    return "\n".join(lines)


def targets(rows, mm):
    """Issue 7's kernel targets 1-4, each with the numbers it rests on. Speed targets are judged on
    GPU time (the graph replays) where a row has it, else on the event timings; both are shown."""
    get = {(r["variant"], r["d"], r["L"], r["mode"], r["impl"]): r for r in rows}
    out = []

    def ratio(v, L, mode):
        r = get.get((v, 64, L, mode, "fused"), {})
        return r.get("graph_vs_best_composed", r.get("vs_best_composed")), r

    def shown(vals):
        return ", ".join(f"L={L}: {fmt(v, '.2f')}x vs {r.get('graph_best_composed', r.get('best_composed'))} "
                         f"(events {fmt(r.get('vs_best_composed'), '.2f')}x)" for L, (v, r) in vals.items())
    for mode, goal in (("fwd", 1.3), ("fwd+bwd", 1.25)):
        vals = {L: ratio("diff_v1", L, mode) for L in LENGTHS if L >= 2048}
        ok = all(v is not None and v >= goal for v, _ in vals.values())
        out.append(f"1. V1 d64 fused {mode} >= {goal}x best composed at L>=2048: {'MET' if ok else 'NOT MET'} "
                   + shown(vals))
    cells = []  # what bounds target 1's forward: both sides run the same attention FLOPs
    for L in LENGTHS:
        fused, calls = (get.get(("diff_v1", 64, L, "fwd", impl), {}) for impl in ("fused", "cudnn-calls-only"))
        key = "graph_ms" if "graph_ms" in fused and "graph_ms" in calls else "ms"
        if key in fused and key in calls:
            cells.append(f"L={L}: {calls[key] / fused[key]:.2f}x")
    out.append("1. bound: V1 d64 fused fwd against cuDNN's two attention calls alone (no combine, no subln; "
               "same FLOPs): " + (", ".join(cells) or "-"))
    r = get.get(("diff_v1", 64, 8192, "fwd", "fused"), {})
    share = r.get("tflops", float("nan")) / mm
    out.append(f"2. V1 d64 fused fwd at L=8192 >= 50% of bf16 matmul ({mm:.0f} TFLOP/s): "
               f"{'MET' if share >= 0.5 else 'NOT MET'} {fmt(r.get('tflops'), '.0f')} TFLOP/s = {share:.0%}")
    vals = {L: ratio("diff_v2", L, "fwd+bwd") for L in LENGTHS}
    ok = all(v is not None and v >= 1.0 for v, _ in vals.values())
    out.append(f"3. V2 d64 fused fwd+bwd no slower than one GQA SDPA call + combine: {'MET' if ok else 'NOT MET'} "
               + shown(vals))
    for v in ("diff_v1", "diff_v2"):
        peaks = {L: get.get((v, 64, L, "fwd+bwd", "fused"), {}).get("peak_mib") for L in LENGTHS}
        out.append(f"4. {v} d64 fused fwd+bwd peak MiB at fixed B*L (flat = linear in L): "
                   + ", ".join(f"L={L}: {fmt(p, '.0f')}" for L, p in peaks.items()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--variants", default="diff_v1,diff_v2")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run through the Triton interpreter")
    ap.add_argument("--subln", action="store_true", help="V1 with its output RMSNorm on every path "
                    "(target 1's composed path: two SDPA calls + combine + subln)")
    _common.kernel_option_args(ap)
    a = ap.parse_args(argv)
    options = _common.kernel_options(a.kernel_options, a.tiles)
    global TOKENS, HEADS
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        TOKENS, HEADS = 64, 2
        device, dtype, dims, lengths = "cpu", torch.float16, [16], [16, 32]
    else:
        if not torch.cuda.is_available():
            sys.exit("kernels_table needs a CUDA GPU (or --smoke)")
        device, dtype = "cuda", torch.bfloat16
        dims, lengths = [int(s) for s in a.dims.split(",")], [int(s) for s in a.lengths.split(",")]
        torch.backends.cuda.matmul.allow_tf32 = False
    # past the limit dynamo would run the compiled composed rows eagerly, under their name
    torch._dynamo.config.recompile_limit = 64
    os.makedirs(a.out, exist_ok=True)
    header = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                  torch=torch.__version__, commit=a.commit, command=" ".join(["python"] + sys.argv),
                  dtype=str(dtype), tokens=TOKENS, heads=HEADS, kernel_options=a.kernel_options or "defaults",
                  tiles=a.tiles or "tuned",
                  subln=a.subln)
    try:
        import triton
        header["triton"] = triton.__version__
    except ImportError:
        pass
    header["matmul_bf16_tflops"] = mm = _common.matmul_tflops() if device == "cuda" else float("nan")
    print(json.dumps(header), flush=True)
    rows = run(a.variants.split(","), dims, lengths, ("fwd", "fwd+bwd"), device, dtype,
               lambda r: print(json.dumps(r), flush=True), subln=a.subln, options=options)
    add_ratios(rows)
    checks = targets(rows, mm)
    # a composed+compile row that dynamo gave up on would have run eagerly under its name
    stats = torch._dynamo.utils.counters["stats"]
    checks.append(f"torch.compile (composed+compile rows): {stats['unique_graphs']} graphs compiled, "
                  f"{sum(torch._dynamo.utils.counters['graph_break'].values())} graph breaks")
    text = "\n".join([f"{k}: {v}" for k, v in header.items()] + ["", markdown(rows), ""] + checks)
    print(text)
    with open(os.path.join(a.out, "kernels_table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "kernels_table.json"), "w") as f:
        json.dump(dict(header=header, rows=rows, targets=checks), f, indent=1)


if __name__ == "__main__":
    main()
