"""`diffattn report` on asv results that real asv runs write here, and on the committed ones.

The generated suite returns values the test chooses per commit (values.json in a throwaway git
repo), so every ratio, direction and regression flag the report prints is checked against
numbers computed here, not copied from its output.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("asv")
pytest.importorskip("matplotlib")

from diffattn import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SUITE = '''
import json, os
V = json.load(open(os.path.join(os.path.dirname(__file__), "values.json")))


class Kern:
    params = (["mlx", "torch"], ["composed", "fused"], ["vanilla", "diff"])
    param_names = ["backend", "impl", "variant"]
    version = "1"

    def track_tflops(self, b, i, v):
        return V["tflops"][b][i][v]
    track_tflops.unit = "TFLOP/s"

    def track_seconds(self, b, i, v):
        return V["seconds"][b][i][v]
    track_seconds.unit = "seconds"
'''


def _values(scale_seconds=1.0, scale_tflops=1.0):
    """tflops: fused twice composed, torch 1.5x mlx, diff 0.8x vanilla, times scale_tflops;
    seconds: the inverse of the unscaled tflops, times scale_seconds."""
    tf = {b: {i: {v: 10.0 * (1.5 if b == "torch" else 1.0) * (2.0 if i == "fused" else 1.0)
                  * (0.8 if v == "diff" else 1.0) * scale_tflops for v in ("vanilla", "diff")}
              for i in ("composed", "fused")} for b in ("mlx", "torch")}
    sec = {b: {i: {v: scale_seconds * scale_tflops / tf[b][i][v] for v in tf[b][i]} for i in tf[b]} for b in tf}
    return {"tflops": tf, "seconds": sec}


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two commits on machine 'cpu-a' (the second with 30% slower seconds and 20% more TFLOP/s),
    the first also on machine 'gpu-b' (everything 100x faster)."""
    repo = tmp_path_factory.mktemp("suite")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "__init__.py").write_text("")
    (repo / "benchmarks" / "bench_fake.py").write_text(SUITE)
    (repo / "asv.conf.json").write_text(json.dumps({
        "version": 1, "project": "fake", "repo": ".", "branches": ["main"], "environment_type": "virtualenv",
        "benchmark_dir": "benchmarks", "results_dir": "results", "html_dir": "html", "env_dir": "env"}))
    git = ["git", "-c", "init.defaultBranch=main"]
    _run(git + ["init", "-q"], repo, env)
    commits = []
    for scale_s, scale_tf in ((1.0, 1.0), (1.3, 1.2)):
        (repo / "benchmarks" / "values.json").write_text(json.dumps(_values(scale_s, scale_tf)))
        _run(git + ["add", "-A"], repo, env)
        _run(git + ["commit", "-q", "-m", f"values {scale_s}"], repo, env)
        commits.append(_run(["git", "rev-parse", "HEAD"], repo, env).strip())
        asv = [sys.executable, "-m", "asv"]
        _run(asv + ["machine", "--machine", "cpu-a", "--yes"], repo, env)
        _run(asv + ["run", "--python=same", "--machine", "cpu-a", "--set-commit-hash", commits[-1]], repo, env)
    # the first commit's values on a second machine, 100x faster
    first = _values(0.01, 100.0)
    (repo / "benchmarks" / "values.json").write_text(json.dumps(first))
    _run(asv + ["machine", "--machine", "gpu-b", "--yes"], repo, env)
    _run(asv + ["run", "--python=same", "--machine", "gpu-b", "--set-commit-hash", commits[0]], repo, env)
    return repo, commits


@pytest.mark.slow
def test_load_results_reads_every_machine_commit_and_combination(results):
    repo, commits = results
    df = report.load_results(repo / "results")
    assert sorted(df["machine"].unique()) == ["cpu-a", "gpu-b"]
    assert set(df[df["machine"] == "cpu-a"]["commit"]) == set(commits)
    # 2 benchmarks x 8 combinations x (2 commits on cpu-a + 1 on gpu-b)
    assert len(df) == 2 * 8 * 3
    row = df[(df["machine"] == "cpu-a") & (df["commit"] == commits[1]) & (df["name"] == "track_tflops")
             & (df["backend"] == "torch") & (df["impl"] == "fused") & (df["variant"] == "diff")]
    assert row["value"].item() == pytest.approx(_values(1.3, 1.2)["tflops"]["torch"]["fused"]["diff"])
    assert set(df[df["name"] == "track_tflops"]["higher_is_better"]) == {True}
    assert set(df[df["name"] == "track_seconds"]["higher_is_better"]) == {False}


@pytest.mark.slow
def test_side_by_side_gain_follows_direction(results):
    repo, _ = results
    new = report.latest(report.load_results(repo / "results"))
    fused = report.side_by_side(new, "impl", "fused", "composed")
    # fused is 2x better both as TFLOP/s (higher) and as seconds (lower)
    assert len(fused) == 2 * 2 * 2 * 2  # machines x benchmarks x backends x variants
    assert fused["gain fused/composed"].to_numpy() == pytest.approx([2.0] * len(fused))
    backends = report.side_by_side(new, "backend", "mlx", "torch")
    assert backends["gain mlx/torch"].to_numpy() == pytest.approx([1 / 1.5] * len(backends))
    diff = report.side_by_side(new, "variant", "diff", "vanilla")
    assert diff["gain diff/vanilla"].to_numpy() == pytest.approx([0.8] * len(diff))


@pytest.mark.slow
def test_machine_table_puts_machines_side_by_side(results):
    repo, _ = results
    table = report.machine_table(report.latest(report.load_results(repo / "results")))
    assert {"cpu-a", "gpu-b"} <= set(table.columns)
    tf = table[table["benchmark"].str.endswith("track_tflops")]
    # newest cpu-a commit has 1.2x the base TFLOP/s, gpu-b 100x the base
    assert (tf["gpu-b"] / tf["cpu-a"]).to_numpy() == pytest.approx([100 / 1.2] * len(tf))


@pytest.mark.slow
def test_history_flags_only_changes_for_the_worse_beyond_threshold(results):
    repo, commits = results
    df = report.load_results(repo / "results")
    hist, regressions = report.history(df, threshold=0.1)
    cpu = hist[hist["machine"] == "cpu-a"]
    assert set(cpu["commits"]) == {2}
    # seconds went up 30%: worse beyond 10%, flagged; TFLOP/s went up 20%: better, not flagged
    assert set(regressions["benchmark"].str.rsplit(".", n=1).str[-1]) == {"track_seconds"}
    assert len(regressions) == 8
    assert regressions["change"].to_numpy() == pytest.approx([0.3] * 8)
    assert set(regressions["to"]) == {commits[1][:8]}
    # at a 50% threshold nothing is a regression
    assert report.history(df, threshold=0.5)[1].empty


@pytest.mark.slow
def test_main_prints_tables_and_writes_plots(results, tmp_path, capsys):
    repo, _ = results
    run = tmp_path / "paired"
    for arm, losses in (("diff", [5.0, 4.0, 3.5]), ("vanilla", [5.0, 4.2, 3.9])):
        (run / arm).mkdir(parents=True)
        lines = [{"kind": "train", "step": i, "loss": l} for i, l in enumerate(losses)]
        lines.append({"kind": "eval", "step": 3, "val_loss": losses[-1]})
        (run / arm / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    plots = tmp_path / "plots"
    code = report.main(["--full", "--results", str(repo / "results"), "--plots", str(plots), "--runs", str(run)])
    out = capsys.readouterr().out
    assert code == 0
    for title in ("MLX vs PyTorch", "fused vs composed", "diff vs vanilla", "machine vs machine",
                  "history", "REGRESSIONS"):
        assert title in out
    assert "2.00x" in out  # fused/composed gain
    names = sorted(p.name for p in plots.iterdir())
    assert "paired_paired.png" in names
    # one history plot per machine and benchmark
    assert len([n for n in names if n.startswith("history_")]) == 2 * 2
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffattn report: error:") and "\n" not in err
    assert report.main(["--results", str(tmp_path), "--threshold", "-1"]) == 2


COMMITTED = ROOT / "benchmarks" / "asv_results"
HAVE_COMMITTED = any(COMMITTED.glob("*/machine.json"))


@pytest.mark.skipif(not HAVE_COMMITTED, reason="no committed asv results")
def test_committed_results_report_has_a_gpu_machine_with_both_backends():
    df = report.load_results(COMMITTED)
    gpu = df[df["machine"].str.startswith("h100") & df["value"].notna()]
    assert not gpu.empty, "no GPU machine in the committed results"
    assert set(gpu["backend"].dropna()) == {"mlx", "torch"}
    # the MLX vs PyTorch table has GPU rows, with the gain the two measured values give
    table = report.side_by_side(report.latest(df), "backend", "mlx", "torch")
    rows = table[table["machine"].str.startswith("h100")]
    assert len(rows) > 10
    # a ratio only means something between positive values (deltas can be 0 or negative)
    expect = [(m / t if h else t / m) if m > 0 and t > 0 else math.nan for m, t, h in
              zip(rows["mlx"], rows["torch"], rows["unit"].map(report.higher_is_better))]
    assert rows["gain mlx/torch"].to_numpy() == pytest.approx(expect, nan_ok=True)
    text = report.build_report(df, 0.1)
    assert "machine vs machine" in text and "h100-sxm" in text


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_COMMITTED, reason="no committed asv results")
def test_asv_publish_succeeds_on_committed_results(tmp_path):
    conf = json.loads("\n".join(l for l in (ROOT / "asv.conf.json").read_text().splitlines()
                                if not l.lstrip().startswith("//")))
    conf.update(repo=str(ROOT), results_dir=str(COMMITTED), html_dir=str(tmp_path / "html"),
                env_dir=str(tmp_path / "env"))
    (tmp_path / "asv.conf.json").write_text(json.dumps(conf))
    r = subprocess.run([sys.executable, "-m", "asv", "publish", "--config", str(tmp_path / "asv.conf.json")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    index = json.loads((tmp_path / "html" / "index.json").read_text())
    measured = {p.parent.name for p in COMMITTED.glob("*/*.json") if p.name != "machine.json"}
    assert set(index["params"]["machine"]) == measured


def _training_rows(figures, machine="cpu", commit="c" * 40):
    """Long-table rows of one commit: figures = {(backend, variant): (tokens/s, step seconds, step noise)}."""
    rows = []
    for (backend, variant), (tps, seconds, noise) in figures.items():
        for bench, value, n in (("bench_training.TrainThroughput.track_tokens_per_second", tps, 0.0),
                                ("bench_training.TrainStep.time_train_step", seconds, noise)):
            rows.append({"machine": machine, "commit": commit, "benchmark": bench, "value": value, "noise": n,
                         "backend": backend, "variant": variant, "preset": "tiny", "impl": None, "shape": None})
    return pd.DataFrame(rows)


def test_contradictions_flag_issue_25s_pair_and_pass_consistent_figures():
    from diffattn.report import contradictions

    # issue 25's run: tokens/s said DIFF 72x vanilla, time_train_step said DIFF 0.67x as fast
    bad = _training_rows({("torch", "vanilla"): (592.55, 0.0144, 0.02), ("torch", "diff"): (42826.96, 0.0215, 0.02)})
    flagged = contradictions(bad, threshold=0.1)
    assert len(flagged) == 1
    row = flagged.iloc[0]
    assert row["pair"] == "diff/vanilla torch tiny"
    assert row["throughput says"] == f"{42826.96 / 592.55:.3g}x" and row["time says"] == f"{0.0144 / 0.0215:.3g}x"
    # 512 tokens a step: tokens/s x seconds = 512 for both (within 5% and 10% + noise allowed)
    good = _training_rows({("torch", "vanilla"): (512 / 0.0100, 0.0100, 0.02),
                           ("torch", "diff"): (512 / 0.0125 * 1.05, 0.0125, 0.02)})
    assert contradictions(good, threshold=0.1).empty
    # the same 5% at a 1% threshold is beyond 1% + 2 x 2% noise: flagged
    assert len(contradictions(good, threshold=0.01)) == 1


def test_regression_needs_more_than_the_figures_measured_noise():
    d = pd.concat([_training_rows({("torch", "vanilla"): (5.0, 0.010, 0.2)}, commit="a" * 40),
                   _training_rows({("torch", "vanilla"): (5.0, 0.013, 0.2)}, commit="b" * 40)])
    d = d.assign(date=pd.Timestamp("2026-01-01", tz="UTC"), run_at=[pd.Timestamp(i, unit="s", tz="UTC")
                                                                    for i in range(len(d))],
                 unit="seconds", higher_is_better=False, params="backend=torch, variant=vanilla, preset=tiny")
    # +30% is beyond the 10% threshold but within 10% + 20% + 20% of noise
    assert report.history(d, threshold=0.1)[1].empty
    assert len(report.history(d.assign(noise=0.0), threshold=0.1)[1]) == 1


@pytest.mark.skipif(not HAVE_COMMITTED, reason="no committed asv results")
def test_default_report_fits_one_screen(capsys):
    assert report.main(["--results", str(COMMITTED), "--no-plots"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 60 and max(map(len, lines)) <= 120, (len(lines), max(map(len, lines)))
    assert any(line.startswith("## regressions beyond") for line in lines)
    assert any(line.startswith("## contradicting pairs") for line in lines)
    assert lines[-1] == "full tables and history: diffattn report --full"
