"""What `diffattn report` prints by default: one screen of the newest figures, the regressions
beyond measured noise, and the figures that contradict each other (diffattn.report has the full
tables behind --full).

Contradictions. A throughput and the time of the same call describe one thing: rate x time is
the work of one call. Where two combinations do the same work (a DIFF variant and its vanilla
twin process the same tokens per training step; two impls or two backends of one attention
variant and shape do the same FLOPs), the ratio of their throughputs must equal the inverse ratio
of their times. A pair whose two ratios differ by more than the threshold plus the times' measured
noise is flagged: one of its four figures is wrong, and neither comparison can be believed.
"""
from __future__ import annotations

import math

# (throughput benchmark, time benchmark of the same call, [(column, reference value)]): every
# combination is compared with its twin that differs only in `column`, holding the reference
# value. The column must not change the work of one call.
CONSISTENT = (
    ("bench_training.TrainThroughput.track_tokens_per_second", "bench_training.TrainStep.time_train_step",
     (("variant", "vanilla"), ("backend", "torch"))),
    ("bench_kernels.AttentionThroughput.track_tflops_forward", "bench_kernels.Attention.time_forward",
     (("impl", "composed"), ("backend", "torch"))),
    ("bench_kernels.AttentionThroughput.track_tflops_forward_backward", "bench_kernels.Attention.time_forward_backward",
     (("impl", "composed"), ("backend", "torch"))),
)
LIST_AT_MOST = 8  # lines per list in the summary; the rest are counted and left to --full


def contradictions(df, threshold: float):
    """Pairs of combinations (same machine and commit) whose throughput ratio and time ratio
    disagree by more than `threshold` plus both times' noise. One row per pair: machine, commit,
    what is compared, the throughput's ratio, the time's ratio (both as "a is N x b")."""
    import pandas as pd

    from diffattn.report import PARAM_COLUMNS

    out = []
    d = df[df["value"].notna()]
    d = d.assign(**{c: (d[c] if c in d else None) for c in PARAM_COLUMNS})  # frames of older suites lack some
    d = d.assign(**{c: d[c].map(lambda v: "-" if v is None or v != v else str(v)) for c in PARAM_COLUMNS})
    for rate_name, time_name, versus in CONSISTENT:
        keys = ["machine", "commit", *PARAM_COLUMNS]
        rate = d[d["benchmark"] == rate_name][keys + ["value"]]
        time = d[d["benchmark"] == time_name][keys + ["value", "noise"]]
        both = rate.merge(time, on=keys, suffixes=("_rate", "_time"))
        for column, ref in versus:
            same = [k for k in keys if k != column]
            pairs = both[both[column] != ref].merge(both[both[column] == ref], on=same, suffixes=("", "_ref"))
            for r in pairs.itertuples(index=False):
                by_rate = r.value_rate / r.value_rate_ref
                by_time = r.value_time_ref / r.value_time
                allowed = threshold + r.noise + r.noise_ref
                if by_rate > 0 and by_time > 0 and abs(math.log(by_rate / by_time)) > math.log1p(allowed):
                    what = " ".join(getattr(r, c) for c in PARAM_COLUMNS if c != column and getattr(r, c) != "-")
                    out.append({"machine": r.machine, "commit": r.commit[:8],
                                "pair": f"{getattr(r, column)}/{ref} {what}",
                                "throughput says": f"{by_rate:.3g}x", "time says": f"{by_time:.3g}x",
                                "allowed": f"{allowed:.0%}", "throughput": rate_name.split(".", 1)[1],
                                "time": time_name.split(".", 1)[1]})
    return pd.DataFrame(out, columns=["machine", "commit", "pair", "throughput says", "time says", "allowed",
                                      "throughput", "time"])


def _short(bench: str) -> str:
    return bench.split(".", 1)[-1]


def best_figures(df):
    """The best value (in each benchmark's direction) of every benchmark on each machine, at the
    newest commit that measured it there: rows benchmark and unit, one column per machine,
    "n/a" where nothing was measured."""
    from diffattn.report import _fmt, commit_order

    d = df[df["value"].notna()].merge(commit_order(df), on=["machine", "commit"])
    d = d[d["rank"] == d.groupby(["machine", "benchmark"])["rank"].transform("max")]
    machines = sorted(df["machine"].unique())
    rows = []
    for (bench, unit), g in d.groupby(["benchmark", "unit"]):
        row = {"benchmark": _short(bench), "unit": unit}
        for m in machines:
            v = g[g["machine"] == m]["value"]
            row[m] = "n/a" if v.empty else _fmt(v.max() if g["higher_is_better"].iloc[0] else v.min(), unit)
        rows.append(row)
    return rows, machines


def _values_of(params: str) -> str:
    """'backend=torch, variant=diff' -> 'torch diff'."""
    return " ".join(kv.split("=", 1)[-1] for kv in params.split(", "))


def _listed(lines, total, title):
    more = f" ({total - LIST_AT_MOST} more: diffattn report --full)" if total > LIST_AT_MOST else ""
    return [f"## {title}: {total}{more}"] + lines[:LIST_AT_MOST]


def build_summary(df, threshold: float, results_dir: str) -> str:
    """The default report, one screen: newest commit per machine, the best figure of every
    benchmark there, regressions beyond threshold and noise, contradicting pairs at any commit."""
    from diffattn.report import _fmt, history, latest

    new = latest(df)
    heads = new.groupby("machine").agg(commit=("commit", "first"), date=("date", "max"))
    lines = [f"# diffattn benchmarks: {df['machine'].nunique()} machine(s), {df['commit'].nunique()} commit(s) "
             f"in {results_dir}",
             "newest: " + ", ".join(f"{m} {r.commit[:8]} ({r.date:%Y-%m-%d})" for m, r in heads.iterrows()), ""]
    rows, machines = best_figures(df)
    width = max([len("benchmark")] + [len(r["benchmark"]) for r in rows])
    unit_w = max([4] + [len(r["unit"]) for r in rows])
    lines.append("## best figure of each benchmark per machine, at the newest commit that measured it")
    lines.append(f"{'benchmark':<{width}}  {'unit':<{unit_w}}  " + "  ".join(f"{m:>10}" for m in machines))
    for r in rows:
        lines.append(f"{r['benchmark']:<{width}}  {r['unit']:<{unit_w}}  " + "  ".join(f"{r[m]:>10}" for m in machines))
    _, regressions = history(df, threshold)
    regressions = regressions.assign(size=regressions["change"].abs()).sort_values("size", ascending=False)
    reg = [f"  {r.machine} {_short(r.benchmark).split('.')[-1]} {_values_of(r.params)}: {_fmt(r.previous, r.unit)} "
           f"-> {_fmt(r.newest, r.unit)} ({r.change:+.0%}, {r['from'][:7]}..{r.to[:7]})" for _, r in regressions.iterrows()]
    lines += [""] + _listed(reg, len(reg), f"regressions beyond {threshold:.0%} and the figures' noise")
    con = contradictions(df, threshold)
    text = [f"  {r.machine} {r.commit[:7]} {r.pair}: throughput {r['throughput says']}, time {r['time says']} "
            f"({r.throughput.split('.')[-1].removeprefix('track_')})" for _, r in con.iterrows()]
    lines += [""] + _listed(text, len(text), "contradicting pairs, any commit (throughput vs time of the same call)")
    return "\n".join(lines)
