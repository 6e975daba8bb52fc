"""`diffattn report`: asv results (every machine, every commit) and run logs as tables and plots.

    diffattn report [--full] [--results DIR] [--threshold 0.1] [--plots DIR | --no-plots] [--runs DIR ...]
    diffattn report --paired DIR [DIR ...] [--plots DIR]    loss and delta by position of paired runs

Reads asv's results JSON directly (schema version 2: machine folders of
`<commit>-<env>.json` files beside `benchmarks.json`) into one long pandas table, one row per
(machine, commit, benchmark, parameter combination). By default it prints one screen
(build_summary: the best figure of every benchmark at each machine's newest commit,
regressions beyond the threshold and measured noise, pairs of figures that contradict each
other, where the plots went); with --full:

- side-by-side tables of the newest commit of each machine: MLX vs PyTorch, fused vs composed
  (vs naive), DIFF vs vanilla, and machine vs machine;
- the history of every benchmark across commits, flagging a regression where the newest value is
  worse than the previous commit's by more than --threshold (relative).

Direction of "better" is explicit: asv itself assumes lower is better, which is right for
time_*, peakmem_* and errors but backwards for throughput. A benchmark is higher-is-better iff
its unit is in HIGHER_IS_BETTER_UNITS; every other unit is lower-is-better. Ratios printed as
"gain" are >1 when the first named side is better in that direction.

Plots (PNG, matplotlib's Agg backend): one history plot per machine and benchmark, and for each
--runs folder (a `diffattn train` run, or a `diffattn paired` run holding diff/ and vanilla/),
the training loss curves from its metrics.jsonl (with eval points).

Imports pandas and matplotlib lazily: they come with the `bench` extra.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path

HIGHER_IS_BETTER_UNITS = frozenset({"TFLOP/s", "tokens/s", "MFU", "accuracy", "x vanilla"})
LOWER_IS_BETTER_UNITS = frozenset({"seconds", "bytes", "nats", "relative error"})
DEFAULT_RESULTS = "benchmarks/asv_results"
PARAM_COLUMNS = ("backend", "impl", "variant", "shape", "preset", "batch")


class ReportError(ValueError):
    """Missing or unreadable results (message is one line)."""


def higher_is_better(unit: str) -> bool:
    return unit in HIGHER_IS_BETTER_UNITS


# ---- loading ----------------------------------------------------------------------------------

def _literal(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not readable asv JSON ({type(e).__name__})") from None


def _combinations(param_lists):
    """asv's cartesian order: the last parameter varies fastest."""
    combos = [()]
    for values in param_lists:
        combos = [c + (v,) for c in combos for v in values]
    return combos


def load_results(results_dir) -> "pandas.DataFrame":
    """Every saved asv result under results_dir as a long table.

    Columns: machine, commit, date (UTC), env, benchmark (full asv name), suite (module.Class),
    name (method), kind (time / peakmem / track), unit, higher_is_better, one column per
    parameter name (values as Python objects), params (the combination as text) and value
    (float; NaN = skipped or failed). Results whose benchmark version differs from the current
    benchmarks.json are left out, as asv itself does."""
    import pandas as pd

    root = Path(results_dir)
    meta_path = root / "benchmarks.json"
    if not meta_path.is_file():
        raise ReportError(f"{root}: no benchmarks.json (run `asv run` or `asv check` first)")
    meta = {k: v for k, v in _load_json(meta_path).items() if isinstance(v, dict)}
    rows = []
    for machine_dir in sorted(p for p in root.iterdir() if (p / "machine.json").is_file()):
        machine = _load_json(machine_dir / "machine.json").get("machine", machine_dir.name)
        for f in sorted(machine_dir.glob("*.json")):
            if f.name == "machine.json":
                continue
            data = _load_json(f)
            if data.get("version") != 2:
                raise ReportError(f"{f}: asv results schema {data.get('version')!r}, expected 2")
            cols = data["result_columns"]
            date = pd.to_datetime(data.get("date", 0), unit="ms", utc=True)
            for bench, entry in data["results"].items():
                info = meta.get(bench)
                if info is None:
                    continue
                rec = dict(zip(cols, entry))
                if rec.get("version") != info.get("version"):
                    continue
                values = rec.get("result")
                run_at = pd.to_datetime(rec.get("started_at") or 0, unit="ms", utc=True)
                param_lists = [[_literal(v) for v in vs] for vs in (rec.get("params") or [])]
                names = info.get("param_names") or [f"param{i}" for i in range(len(param_lists))]
                combos = _combinations(param_lists)
                if not isinstance(values, list):
                    values = [values]
                q25, q75 = (rec.get(k) or [None] * len(values) for k in ("stats_q_25", "stats_q_75"))
                for combo, value, lo, hi in zip(combos, values, q25, q75):
                    row = {"machine": machine, "commit": data["commit_hash"], "date": date, "run_at": run_at,
                           "env": data.get("env_name"), "benchmark": bench,
                           "suite": bench.rsplit(".", 1)[0], "name": bench.rsplit(".", 1)[-1],
                           "kind": info.get("type"), "unit": info.get("unit"),
                           "params": ", ".join(f"{n}={v}" for n, v in zip(names, combo)),
                           "value": float("nan") if value is None else float(value),
                           "noise": _noise(value, lo, hi)}
                    row.update(dict(zip(names, combo)))
                    rows.append(row)
    if not rows:
        raise ReportError(f"{root}: no asv results of the current benchmarks in any machine folder")
    df = pd.DataFrame(rows)
    df["higher_is_better"] = df["unit"].map(higher_is_better)
    for c in PARAM_COLUMNS:
        if c not in df:
            df[c] = None
    return df


def _noise(value, q25, q75) -> float:
    """The interquartile range of a time_ benchmark's samples over its median (asv keeps the
    quartiles of time_ benchmarks only); 0 where asv kept none (track_ figures, --quick runs)."""
    if value is None or q25 is None or q75 is None or not value > 0:
        return 0.0
    return float((q75 - q25) / value)


def commit_order(df):
    """(machine, commit, rank) with rank 0 the oldest: by commit date, ties (commits in the same
    second) broken by when the benchmarks ran."""
    order = df.groupby(["machine", "commit"]).agg(date=("date", "max"), run_at=("run_at", "max")).reset_index()
    order = order.sort_values(["machine", "date", "run_at"])
    order["rank"] = order.groupby("machine").cumcount()
    return order[["machine", "commit", "rank"]]


def latest(df):
    """Rows of the newest commit of each machine."""
    order = commit_order(df)
    newest = order[order["rank"] == order.groupby("machine")["rank"].transform("max")]
    return df.merge(newest[["machine", "commit"]], on=["machine", "commit"])


# ---- side-by-side tables ---------------------------------------------------------------------

def _gain(a, b, higher):
    """How many times better a is than b (>1: a better), in the benchmark's direction."""
    if not (a > 0 and b > 0):
        return float("nan")
    return a / b if higher else b / a


def side_by_side(df, column: str, a, b, others=()):
    """Pivot `column` into columns; `gain` = how many times better `a` is than `b`.
    Rows: machine, benchmark and the remaining parameters; only rows where a and b both ran."""
    import pandas as pd

    d = df[df[column].isin([a, b, *others]) & df["value"].notna()]
    if d.empty:
        return pd.DataFrame()
    keys = ["machine", "benchmark", "unit", "higher_is_better"] + [c for c in PARAM_COLUMNS if c != column
                                                                     and d[c].notna().any()]
    # missing parameters (a benchmark without `shape`, say) become "-": pivot_table drops NA keys
    d = d.assign(**{k: d[k].map(lambda v: "-" if v is None or v != v else str(v))
                    for k in keys if k != "higher_is_better"})
    table = d.pivot_table(index=keys, columns=column, values="value", aggfunc="first")
    if a not in table or b not in table:
        return pd.DataFrame()
    table = table.dropna(subset=[a, b])
    higher = table.index.get_level_values("higher_is_better")
    table[f"gain {a}/{b}"] = [_gain(x, y, h) for x, y, h in zip(table[a], table[b], higher)]
    table = table.reset_index().drop(columns=["higher_is_better"])
    return table[[c for c in table.columns if c not in others or c in table]]


def machine_table(df):
    """The newest value of every benchmark on every machine, machines as columns."""
    d = df[df["value"].notna()]
    return d.pivot_table(index=["benchmark", "unit", "params"], columns="machine", values="value",
                         aggfunc="first").reset_index()


# ---- history ---------------------------------------------------------------------------------

def history(df, threshold: float):
    """Per machine, benchmark and parameters: values by commit (oldest first) and, where the
    newest commit is worse than the one before by more than `threshold` plus the two figures'
    measured noise (relative, in the benchmark's direction), a regression flag. Returns (wide
    history table, regressions)."""
    import pandas as pd

    d = df[df["value"].notna()].merge(commit_order(df), on=["machine", "commit"])
    rows, regressions = [], []
    for (machine, bench, params), g in d.groupby(["machine", "benchmark", "params"], sort=True):
        g = g.sort_values("rank")
        values = list(zip(g["commit"].str[:8], g["value"]))
        noise = list(g["noise"])
        higher = bool(g["higher_is_better"].iloc[0])
        row = {"machine": machine, "benchmark": bench, "params": params, "unit": g["unit"].iloc[0],
               "commits": len(values), "values": " -> ".join(_fmt(v, g["unit"].iloc[0]) for _, v in values)}
        if len(values) >= 2:
            (c_prev, prev), (c_new, new) = values[-2], values[-1]
            change = (new - prev) / abs(prev) if prev else float("nan")
            worse = -change if higher else change
            row["change"] = change
            if worse > threshold + noise[-2] + noise[-1]:  # beyond the threshold and both figures' noise
                row["flag"] = "REGRESSION"
                regressions.append({**row, "from": c_prev, "to": c_new, "previous": prev, "newest": new})
        rows.append(row)
    columns = ["machine", "benchmark", "params", "unit", "commits", "values", "change", "flag", "from", "to",
               "previous", "newest"]
    return pd.DataFrame(rows), pd.DataFrame(regressions, columns=columns)


# ---- formatting ------------------------------------------------------------------------------

def _fmt(v, unit=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "seconds":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
            if abs(v) >= scale:
                return f"{v / scale:.3g}{suffix}"
        return f"{v * 1e9:.3g}ns"
    if unit == "bytes":
        return f"{v / 2 ** 20:.4g}MiB"
    return f"{v:.4g}"


def format_table(table, title: str) -> str:
    if table is None or table.empty:
        return f"## {title}\n(no rows: nothing measured on both sides)\n"
    t = table.copy()
    for c in t.columns:
        if t[c].dtype.kind == "f":
            units = t["unit"] if "unit" in t else None
            if str(c).startswith("gain") or c == "change":
                t[c] = [("-" if math.isnan(x) else (f"{x:+.1%}" if c == "change" else f"{x:.2f}x")) for x in t[c]]
            else:
                t[c] = [_fmt(x, u) for x, u in zip(t[c], units if units is not None else [None] * len(t))]
    return f"## {title}\n{t.to_string(index=False)}\n"


# ---- plots -----------------------------------------------------------------------------------

def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_history(df, out_dir) -> list[Path]:
    """One PNG per machine and benchmark: each parameter combination a line over commits."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = df[df["value"].notna()]
    written = []
    order = commit_order(df)
    for (machine, bench), g in d.groupby(["machine", "benchmark"]):
        commits = order[order["machine"] == machine].set_index("commit")["rank"]
        commits = commits[commits.index.isin(g["commit"])].sort_values()
        x = {c: i for i, c in enumerate(commits.index)}
        fig, ax = plt.subplots(figsize=(12, 4.5))
        for params, s in g.groupby("params"):
            s = s.assign(x=s["commit"].map(x)).sort_values("x")
            ax.plot(s["x"], s["value"], marker="o", label=params)
        unit = g["unit"].iloc[0]
        ax.set_xticks(range(len(commits)), [c[:8] for c in commits.index], rotation=30, fontsize=8)
        ax.set_xlabel("commit (oldest first)")
        ax.set_ylabel(f"{unit} ({'higher' if higher_is_better(unit) else 'lower'} is better)")
        if g["value"].gt(0).all() and g["value"].max() / g["value"].min() > 50:
            ax.set_yscale("log")
        ax.set_title(f"{bench} on {machine}", fontsize=9)
        if g["params"].nunique() <= 40:  # beside the axes, never over the points
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        written.append(_save(plt, fig, out_dir / f"history_{_safe(machine)}_{_safe(bench)}.png"))
    return written


def read_metrics(run_dir) -> tuple[list, list]:
    """(train rows, eval rows) of a run folder's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a `diffattn train` run folder)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            (train if obj.get("kind") == "train" else evals if obj.get("kind") == "eval" else []).append(obj)
    return train, evals


def plot_runs(run_dirs, out_dir) -> list[Path]:
    """Loss curves: a paired run folder (diff/ and vanilla/ inside) gives both arms on one plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run in map(Path, run_dirs):
        written.append(plot_run(run, out_dir / f"{'paired' if _arms(run)[1:] else 'run'}_{_safe(run.name)}.png"))
        arms = _arms(run)
        for label, arm in arms:
            diag = read_diagnostics(arm)
            if diag:
                written.append(plot_diagnostics(diag, f"{run} {label}" if len(arms) > 1 else str(run),
                                                out_dir / f"diag_{_safe(run.name)}_{_safe(label)}.png"))
    return written


def _arms(run: Path) -> list:
    """(label, folder) of each training run in a run folder: a paired run's seed_S/diff and
    seed_S/vanilla (or diff/ and vanilla/), else the folder itself."""
    arms = [(f"{f.parent.name} {f.name}", f) for f in sorted(run.glob("seed_*/*")) if (f / "metrics.jsonl").is_file()]
    return arms or [(a, run / a) for a in ("diff", "vanilla") if (run / a / "metrics.jsonl").is_file()] \
        or [(run.name, run)]


def plot_paired(paired_dirs, out_dir) -> list[Path]:
    """Per paired run folder (its paired.json): held-out loss by position for both twins (mean
    over seeds), and the delta DIFF - vanilla by position with its 95% t interval over seeds."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for run in map(Path, paired_dirs):
        if not (run / "paired.json").is_file():
            raise ReportError(f"{run}: no paired.json (not a `diffattn paired` run folder)")
        r = _load_json(run / "paired.json")
        mids = [(lo + hi - 1) / 2 for lo, hi in r["position_bins"]]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
        for arm, label in (("diff", r["attention"]), ("vanilla", "vanilla")):
            curves = [p[arm]["loss_by_position"] for p in r["per_seed"]]
            top.plot(mids, [sum(c) / len(c) for c in zip(*curves)], "o-", label=label)
        top.set_ylabel("held-out loss (nats/token)")
        top.legend(fontsize=8)
        bins = r["summary"]["loss_by_position"]
        bottom.axhline(0.0, color="gray", lw=0.8)
        bottom.plot(mids, [b["mean"] for b in bins], "o-", color="black", label=f"{r['attention']} - vanilla")
        if bins[0]["t_interval"] is not None:
            bottom.fill_between(mids, [b["t_interval"][0] for b in bins], [b["t_interval"][1] for b in bins],
                                alpha=0.25, label=f"{bins[0]['level']:.0%} t interval over {bins[0]['n']} seeds")
        bottom.set_xlabel("target position")
        bottom.set_ylabel("delta loss (nats/token)")
        bottom.legend(fontsize=8)
        total = r["summary"]["val_loss"]
        top.set_title(f"{run}: {r['attention']} vs vanilla, {r['data']}, seeds {r['summary']['seeds']}; "
                      f"delta {total['mean']:+.4f} nats", fontsize=9)
        written.append(_save(plt, fig, out_dir / f"paired_by_position_{_safe(run.name)}.png"))
    return written


def plot_run(run, path) -> Path:
    """One run folder's training loss (and eval) curves as a PNG at `path`."""
    plt = _pyplot()
    run = Path(run)
    arms = _arms(run)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, arm in arms:
        train, evals = read_metrics(arm)
        line, = ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=f"{label} train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", color=line.get_color(),
                    label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{'paired run' if len(arms) > 1 else 'run'} {run}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, Path(path))


def read_diagnostics(run_dir) -> list[dict]:
    """The {"kind": "diag"} records of a run's metrics.jsonl (diffattn.diagnostics), by step."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"diag"' in line] if path.is_file() else []
    return sorted((r for r in rows if r.get("kind") == "diag"), key=lambda r: r["step"])


DIAG_PANELS = (("lambda", "lambda (V1) / mean lambda_t (V2)"), ("entropy", "map entropy (nats)"),
               ("neg_ratio", "||lambda_mix lambda A2 V|| / ||A1 V||"))


def plot_diagnostics(diag: list[dict], title: str, path: Path) -> Path:
    """Three panels against step, one line per diagnosed layer: lambda (V2: mean lambda_t, its
    spread shaded), the entropies of both maps and of their difference, the negative map's share."""
    plt = _pyplot()
    steps = [r["step"] for r in diag]
    layers = list(diag[0]["layers"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for layer in layers:
        col = lambda k: [r["layers"][layer].get(k, float("nan")) for r in diag]  # noqa: E731
        if "lambda" in diag[0]["layers"][layer]:
            axes[0].plot(steps, col("lambda"), label=f"layer {layer}")
        elif "lambda_mean" in diag[0]["layers"][layer]:
            mean, std = col("lambda_mean"), col("lambda_std")
            line, = axes[0].plot(steps, mean, label=f"layer {layer}")
            axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                 color=line.get_color(), alpha=0.2)
        line, = axes[1].plot(steps, col("entropy_pos"), label=f"layer {layer} A1")
        if "entropy_neg" in diag[0]["layers"][layer]:
            axes[1].plot(steps, col("entropy_neg"), ":", color=line.get_color(), label=f"layer {layer} A2")
            axes[1].plot(steps, col("entropy_diff"), "--", color=line.get_color(), label=f"layer {layer} A1-lA2")
            axes[2].plot(steps, col("neg_ratio"), color=line.get_color(), label=f"layer {layer}")
    if any(r["lambda_mix"] != 1.0 for r in diag):
        axes[2].plot(steps, [r["lambda_mix"] for r in diag], "k:", lw=1, label="lambda_mix")
    for ax, (_, ylabel) in zip(axes, DIAG_PANELS):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(f"DIFF diagnostics {title}", fontsize=9)
    return _save(plt, fig, path)


# ---- the one-screen summary -----------------------------------------------------------------
#
# What `diffattn report` prints by default: one screen of the newest figures, the regressions
# beyond measured noise, and the figures that contradict each other (build_report has the full
# tables behind --full).
#
# Contradictions. A throughput and the time of the same call describe one thing: rate x time is
# the work of one call. Where two combinations do the same work (a DIFF variant and its vanilla
# twin process the same tokens per training step; two impls or two backends of one attention
# variant and shape do the same FLOPs), the ratio of their throughputs must equal the inverse ratio
# of their times. A pair whose two ratios differ by more than the threshold plus the times' measured
# noise is flagged: one of its four figures is wrong, and neither comparison can be believed.

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


# ---- the command -----------------------------------------------------------------------------

def build_report(df, threshold: float) -> str:
    new = latest(df)
    parts = [f"# diffattn benchmark report\nmachines: {', '.join(sorted(df['machine'].unique()))}; "
             f"{df['commit'].nunique()} commit(s); newest commit per machine: "
             + ", ".join(f"{m} {c[:8]}" for m, c in new.groupby("machine")["commit"].first().items())
             + f"\nhigher is better for units {sorted(HIGHER_IS_BETTER_UNITS)}; lower for all others. "
             "gain a/b > 1 means a is better.\n"]
    parts.append(format_table(side_by_side(new, "backend", "mlx", "torch"), "MLX vs PyTorch (newest commit per machine)"))
    parts.append(format_table(side_by_side(new, "impl", "fused", "composed", others=("naive",)),
                              "fused vs composed (and naive)"))
    for other in ("diff", "diff_v2"):
        parts.append(format_table(side_by_side(new, "variant", other, "vanilla"), f"{other} vs vanilla"))
    parts.append(format_table(machine_table(new), "machine vs machine (newest commit of each)"))
    hist, regressions = history(df, threshold)
    multi = hist[hist["commits"] >= 2] if not hist.empty else hist
    parts.append(format_table(multi.drop(columns=[c for c in ("flag",) if c in multi and not multi[c].notna().any()]),
                              "history (benchmarks with results at 2+ commits)"))
    if regressions.empty:
        parts.append(f"## regressions\nnone beyond {threshold:.0%}\n")
    else:
        parts.append(format_table(regressions[["machine", "benchmark", "params", "unit", "from", "to", "previous",
                                               "newest", "change"]],
                                  f"REGRESSIONS: newest commit worse than the previous by more than {threshold:.0%}"))
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffattn report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=None, help=f"asv results folder (default: asv.conf.json's results_dir, "
                   f"else {DEFAULT_RESULTS})")
    p.add_argument("--threshold", type=float, default=0.10, help="relative change flagged as a regression (0.10)")
    p.add_argument("--full", action="store_true", help="every table and the whole history, not the one-screen summary")
    p.add_argument("--plots", default="benchmarks/plots", help="folder for PNG plots (benchmarks/plots)")
    p.add_argument("--no-plots", action="store_true", help="print tables only")
    p.add_argument("--runs", nargs="*", default=[], help="run folders (train or paired) to plot loss curves of")
    p.add_argument("--csv", default=None, help="also write the long results table to this CSV file")
    p.add_argument("--paired", nargs="+", default=None, metavar="DIR",
                   help="plot these paired run folders (loss and delta by position, with intervals) and stop")
    args = p.parse_args(argv)
    try:
        if args.paired:
            written = plot_paired(args.paired, args.plots) + plot_runs(args.runs, args.plots)
            print(f"wrote {len(written)} plot(s) to {args.plots}: {', '.join(map(str, written))}")
            return 0
        if not args.threshold > 0:
            raise ReportError(f"--threshold must be positive, got {args.threshold}")
        results = args.results or _results_dir_from_config()
        df = load_results(results)
        if args.full:
            print(build_report(df, args.threshold))
            print(format_table(contradictions(df, args.threshold),
                               "CONTRADICTIONS: throughput and time ratios of a pair disagree (every commit)"))
        else:
            print(build_summary(df, args.threshold, results))
        if args.csv:
            df.to_csv(args.csv, index=False)
        if not args.no_plots:
            written = plot_history(df, args.plots) + plot_runs(args.runs, args.plots)
            print(f"\nplots: {len(written)} PNG file(s) in {Path(args.plots).resolve()} "
                  "(history_<machine>_<benchmark>.png; run_*/paired_* for --runs)")
        if not args.full:
            print("full tables and history: diffattn report --full")
    except (ReportError, ImportError) as e:
        print(f"diffattn report: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def _results_dir_from_config(conf="asv.conf.json") -> str:
    """results_dir of asv.conf.json in the current folder (asv's JSON allows // comments)."""
    path = Path(conf)
    if not path.is_file():
        return DEFAULT_RESULTS
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("//"))
    try:
        return json.loads(text).get("results_dir", DEFAULT_RESULTS)
    except json.JSONDecodeError:
        return DEFAULT_RESULTS


if __name__ == "__main__":
    sys.exit(main())
