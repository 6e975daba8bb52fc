"""Long-context probes of trained language models: needle in a haystack and multi-query associative
recall, over any backend (the Backend protocol's token_losses), with heatmaps of paired twins.

Both probes plant facts in held-out text of the run's own corpus (the validation split, tokenized
with the run's tokenizer) and ask for them at the end of the context:

    ... haystack ... {key}={value}. ... haystack ... {key}={value}
                                                      ^ the query, last in the row

keys are random 5-letter lowercase words, values random 5-digit numbers. `needle`: one fact at a
depth (0 = the start of the haystack, 1 = just before the query) for each context length; a cell
is (length, depth). `mqar`: n facts at random depths, then one query per asked fact (up to
--queries, each its own row); a cell is (length, pairs).

Scoring (chance is exact): a query is answered correctly when the true value has the highest total
log-probability, given the context and the query, among 1 + 9 candidates: the true value and
9 distractors of the same form (for mqar, the other planted facts' values first, then random
numbers). Chance is 1/10 whatever the model. Accuracy per cell = correct / asked, with its
binomial standard error. Rows are scored by teacher forcing (one forward per candidate row;
candidates differ only in the value tokens, padded at the end to one length), so any backend
scores them, without the cache.

    result = run_probe(model, tokenizer, val_streams, "needle", lengths=[256, 512], depths=[0, .5, 1])
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CANDIDATES = 10  # the true value and 9 distractors: chance 1/10
FACT = " {key}={value}. "  # short, so that a fact and its query fit even a 64-token context
QUERY = " {key}="
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PAIRS = (1, 2, 4, 8, 16)


class ProbeError(ValueError):
    """A probe that cannot run on this model or data (message is one line)."""


class TooShort(ProbeError):
    """A context length too short for a cell's facts and query."""


def _key(rng) -> str:
    return "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, 5))


def _value(rng) -> str:
    return str(int(rng.integers(10000, 100000)))


def default_lengths(max_seq_len: int) -> list[int]:
    """Powers of two from 128 up to the model's context (and the context itself)."""
    out = [n for n in (128, 256, 512, 1024, 2048, 4096, 8192) if n < max_seq_len]
    return out + [max_seq_len]


class Planter:
    """Builds candidate rows: haystack windows of the held-out streams with facts planted."""

    def __init__(self, tokenizer, streams: list[np.ndarray], seed: int):
        self.tok, self.streams = tokenizer, [s for s in streams if len(s)]
        self.rng = np.random.default_rng(seed)
        if not self.streams:
            raise ProbeError("probes need held-out text: the run's data has an empty validation split")

    def enc(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)]

    def hay(self, n: int) -> list[int]:
        sizes = np.array([len(s) for s in self.streams])
        if n > sizes.max():
            raise ProbeError(f"the held-out split's longest stream has {sizes.max()} tokens, a probe row needs {n}")
        k = int(self.rng.choice(np.flatnonzero(sizes >= n)))
        start = int(self.rng.integers(0, sizes[k] - n + 1))
        return [int(t) for t in self.streams[k][start:start + n]]

    def trial(self, length: int, depths: list[float], asked: list[int]):
        """Facts planted at `depths` in a haystack so that context + query + value fill `length`
        tokens; for each asked fact, CANDIDATES rows (the true value first) and the positions of
        the value tokens in each row. Returns [(rows list, value spans)] per asked fact."""
        keys = []
        while len(keys) < len(depths):  # distinct keys
            k = _key(self.rng)
            keys += [k] if k not in keys else []
        values = [_value(self.rng) for _ in depths]
        facts = [self.enc(FACT.format(key=k, value=v)) for k, v in zip(keys, values)]
        out = []
        for a in asked:
            query = self.enc(QUERY.format(key=keys[a]))
            others = [v for i, v in enumerate(values) if i != a and v != values[a]][:CANDIDATES - 1]
            while len(others) < CANDIDATES - 1:
                v = _value(self.rng)
                others += [v] if v != values[a] and v not in others else []
            cands = [self.enc(v) for v in [values[a]] + others]
            out.append((query, cands))
        longest = max(len(c) for _, cands in out for c in cands)
        n_hay = length - sum(map(len, facts)) - max(len(q) for q, _ in out) - longest
        if n_hay < 0:
            raise TooShort(f"context length {length} is too short for {len(depths)} facts and a query")
        hay = self.hay(n_hay)
        ctx = list(hay)
        for at, fact in sorted(((round(d * n_hay), f) for d, f in zip(depths, facts)), key=lambda t: -t[0]):
            ctx[at:at] = fact
        trials = []
        for query, cands in out:
            base = ctx + query
            rows = [base + c + [0] * (length - len(base) - len(c)) for c in cands]
            trials.append((rows, [(len(base), len(base) + len(c)) for c in cands]))
        return trials


def score(model, trials, batch_size: int = 16) -> np.ndarray:
    """For each trial's rows, whether row 0 (the true value) has the highest total log-probability
    of its value tokens. Returns a bool array, one per trial."""
    rows, spans = [], []
    for r, s in trials:
        rows += r
        spans += s
    batch = np.asarray(rows, np.int64)
    logp = np.empty(len(rows))
    for i in range(0, len(rows), batch_size):
        nll = model.token_losses(batch[i:i + batch_size])  # (b, L-1): position t predicts token t+1
        for j, (a, b) in enumerate(spans[i:i + batch_size]):
            logp[i + j] = -nll[j, a - 1:b - 1].sum()
    logp = logp.reshape(len(trials), CANDIDATES)
    return logp[:, 0] > logp[:, 1:].max(1)


def run_probe(model, tokenizer, streams, task: str, lengths=None, depths=DEFAULT_DEPTHS, pairs=DEFAULT_PAIRS,
              trials: int = 10, queries: int = 4, seed: int = 0, batch_size: int = 16, progress=None) -> dict:
    """Per-cell accuracy of one model: needle (length x depth) or mqar (length x pairs)."""
    if task not in ("needle", "mqar"):
        raise ProbeError(f"unknown probe task {task!r}, expected needle or mqar")
    if tokenizer is None:
        raise ProbeError("probes need the run's tokenizer (a text language model), found none")
    lengths = list(lengths or default_lengths(model.cfg.max_seq_len))
    too_long = [n for n in lengths if n - 1 > model.cfg.max_seq_len]
    if too_long:
        raise ProbeError(f"context lengths {too_long} exceed the model's max_seq_len {model.cfg.max_seq_len} (+1)")
    cols = list(depths) if task == "needle" else list(pairs)
    planter = Planter(tokenizer, streams, seed)
    acc = np.zeros((len(lengths), len(cols)))
    count = np.zeros_like(acc, dtype=np.int64)
    for i, n in enumerate(lengths):
        for j, c in enumerate(cols):
            made = []
            try:
                for _ in range(trials):
                    if task == "needle":
                        made += planter.trial(n, [float(c)], [0])
                    else:
                        ds = sorted(planter.rng.random(int(c)).tolist())
                        asked = planter.rng.permutation(int(c))[:queries].tolist()
                        made += planter.trial(n, ds, asked)
            except TooShort:
                acc[i, j] = np.nan  # the facts and the query do not fit this length: no cell
                continue
            ok = score(model, made, batch_size)
            acc[i, j], count[i, j] = ok.mean(), ok.size
            if progress:
                progress(f"{task} length {n} {'depth' if task == 'needle' else 'pairs'} {c}: {ok.mean():.2f}")
    return {"task": task, "lengths": lengths, "columns": cols, "column_name": "depth" if task == "needle" else "pairs",
            "accuracy": [[None if a != a else a for a in row] for row in acc.tolist()], "asked": count.tolist(),
            "stderr": np.sqrt(acc * (1 - acc) / np.maximum(count, 1)).tolist(),
            "chance": 1.0 / CANDIDATES, "candidates": CANDIDATES, "trials": trials, "seed": seed,
            "scoring": "true value ranked first by total log-probability among 1 + 9 same-form candidates"}


def table(results: dict[str, dict]) -> str:
    """Markdown: one block per model label, rows = context length, columns = depth or pairs."""
    out = []
    for label, r in results.items():
        out += [f"**{label}** ({r['task']}; accuracy, chance {r['chance']:.2f}, {max(map(max, r['asked']))} asked "
                f"per cell, n/a: the facts do not fit the length)", "",
                "| length | " + " | ".join(f"{r['column_name']} {c}" for c in r["columns"]) + " |",
                "| ---: |" + " ---: |" * len(r["columns"])]
        for n, row in zip(r["lengths"], r["accuracy"]):
            out.append(f"| {n} | " + " | ".join("n/a" if a is None else f"{a:.2f}" for a in row) + " |")
        out.append("")
    return "\n".join(out)


def heatmap(results: dict[str, dict], path) -> Path:
    """PNG of each model's grid and, for exactly two (DIFF first), their difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    grids = [np.array(results[k]["accuracy"], dtype=float) for k in labels]  # None (no cell) -> NaN
    panels = list(zip(labels, grids, ["viridis"] * len(grids), [(0, 1)] * len(grids)))
    if len(grids) == 2:
        panels.append((f"{labels[0]} - {labels[1]}", grids[0] - grids[1], "RdBu", (-1, 1)))
    r0 = results[labels[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, g, cmap, (lo, hi)) in zip(axes[0], panels):
        im = ax.imshow(g, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", origin="lower")
        ax.set_xticks(range(len(r0["columns"])), [str(c) for c in r0["columns"]])
        ax.set_yticks(range(len(r0["lengths"])), [str(n) for n in r0["lengths"]])
        ax.set_xlabel(r0["column_name"])
        ax.set_ylabel("context length (tokens)")
        ax.set_title(f"{title} ({r0['task']})")
        for (y, x), v in np.ndenumerate(g):
            if v == v:
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if cmap == "viridis" else "k")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"accuracy, chance {r0['chance']:.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- from run folders ----------------------------------------------------------------------------

def held_out(manifest: dict, run_dir) -> list[np.ndarray]:
    """The validation token streams of a run's corpus, tokenized with the run's tokenizer."""
    from diffattn import data

    info = manifest.get("data", {})
    if info.get("task", "lm") != "lm":
        raise ProbeError(f"the run trained on {info.get('name')!r}, a synthetic task: probes need a language model")
    tok_file = Path(run_dir) / "tokenizer.json"
    d = data.load(info["name"], info.get("tokenizer") or "byte", tokenizer_file=tok_file if tok_file.is_file() else None)
    return d.val


def twins(path) -> dict[str, Path]:
    """{label: run folder}: a paired run's two twins (DIFF first; of a multi-seed run, the first
    seed's; give PAIRED/seed_S for another), or the one run given."""
    path = Path(path)
    seeds = sorted(path.glob("seed_*"), key=lambda d: int(d.name[5:]) if d.name[5:].isdigit() else -1)
    if seeds and not (path / "diff").is_dir():  # a multi-seed paired run: the first seed's twins
        att = "diff"
        try:
            att = json.loads((path / "paired.json").read_text()).get("attention", "diff")
        except (OSError, ValueError):
            pass
        return {att: seeds[0] / "diff", "vanilla": seeds[0] / "vanilla"}
    if (path / "paired.json").is_file() or ((path / "diff").is_dir() and (path / "vanilla").is_dir()):
        att = "diff"
        try:
            att = json.loads((path / "paired.json").read_text()).get("attention", "diff")
        except (OSError, ValueError):
            pass
        return {att: path / "diff", "vanilla": path / "vanilla"}
    return {path.name: path}


def main(argv=None) -> int:
    """`diffattn probe RUN_OR_PAIRED --task needle|mqar ...`: grids, a table and a heatmap."""
    import argparse
    import sys

    from diffattn.generate import load_run

    ap = argparse.ArgumentParser(prog="diffattn probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder or checkpoint, or a paired run folder (both twins)")
    ap.add_argument("--task", required=True, help="needle | mqar")
    ap.add_argument("--lengths", default=None, help="context lengths, comma separated (default: 128 .. max_seq_len)")
    ap.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)))
    ap.add_argument("--pairs", default=",".join(map(str, DEFAULT_PAIRS)))
    ap.add_argument("--trials", type=int, default=10, help="trials per cell (mqar: each asks up to --queries)")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--out", default=None, help="folder for probe_<task>.json / .md / .png (default: the run folder)")
    args = ap.parse_args(argv)
    from diffattn.cli import _bad_input_errors

    try:
        nums = lambda s, f: [f(x) for x in s.split(",") if x.strip()]  # noqa: E731
        results = {}
        for label, run in twins(args.run).items():
            model, tok, manifest = load_run(run, args.backend, args.device, args.dtype, args.kernels)
            from diffattn.harness import find_checkpoint
            streams = held_out(manifest, find_checkpoint(run).parent.parent)
            results[label] = run_probe(model, tok, streams, args.task,
                                       nums(args.lengths, int) if args.lengths else None, nums(args.depths, float),
                                       nums(args.pairs, int), args.trials, args.queries, args.seed, args.batch_size,
                                       progress=lambda m, label=label: print(f"{label}: {m}", file=sys.stderr))
        out = Path(args.out or args.run)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"probe_{args.task}"
        stem.with_suffix(".json").write_text(json.dumps({"run": str(args.run), "backend": args.backend,
                                                         "results": results}, indent=1))
        text = table(results)
        stem.with_suffix(".md").write_text(f"# {args.task} probe of {args.run}\n\n{__doc__.split(chr(10) * 2)[2]}\n\n{text}")
        png = heatmap(results, stem.with_suffix(".png"))
        print(text)
        print(f"wrote {stem}.json, {stem}.md and {png}")
    except (*_bad_input_errors(), ValueError) as e:
        print(f"diffattn probe: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
