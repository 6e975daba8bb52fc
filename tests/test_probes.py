"""The long-context probes (diffattn/probes.py) against models whose answers are known: an
induction oracle (predicts the token that followed the latest earlier occurrence of the last six
tokens) finds every planted fact; the same oracle limited to a window of recent tokens finds the
facts planted near the query and none planted far; a model that ignores its context never ranks
the true value first (ties count as wrong). Then `diffattn probe` on a paired run's twins."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from diffattn import data, probes


class Induction:
    """token_losses of a copying model: 0 nats where the next token is the one that followed the
    latest earlier match of the last n tokens within `window` positions, 20 where it is not, ln 256
    where nothing matches."""

    def __init__(self, n=6, window=None, max_seq_len=512):
        self.n, self.window = n, window
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)

    def token_losses(self, batch):
        batch = np.asarray(batch)
        out = np.full((batch.shape[0], batch.shape[1] - 1), np.log(256.0))
        n = self.n
        for b, row in enumerate(batch.tolist()):
            latest = {}  # n-gram -> the last position it ended at
            for t in range(n - 1, len(row) - 1):
                gram = tuple(row[t - n + 1:t + 1])
                s = latest.get(gram)
                if s is not None and (self.window is None or t - s <= self.window):
                    out[b, t] = 0.0 if row[s + 1] == row[t + 1] else 20.0
                latest[gram] = t
        return out


class Blind:
    cfg = SimpleNamespace(max_seq_len=512)

    def token_losses(self, batch):
        return np.ones((len(batch), np.shape(batch)[1] - 1))


@pytest.fixture(scope="module")
def pydoc():
    d = data.load("builtin:pydoc")
    return d.tokenizer, d.val


def test_rows_plant_the_fact_at_its_depth_and_end_with_the_candidates(pydoc):
    tok, val = pydoc
    planter = probes.Planter(tok, val, seed=3)
    for depth in (0.0, 0.5, 1.0):
        (rows, spans), = planter.trial(200, [depth], [0])
        assert len(rows) == probes.CANDIDATES and all(len(r) == 200 for r in rows)
        text = tok.decode(rows[0]).decode()
        key = text[text.rindex("=") - 5:text.rindex("=")]
        value = tok.decode(rows[0][spans[0][0]:spans[0][1]]).decode()
        fact = f" {key}={value}. "
        at = text.index(fact)
        hay = 200 - len(fact) - len(f" {key}=") - len(value)
        assert at == round(depth * hay), (depth, at)
        assert text.endswith(f" {key}={value}")  # the query and the true value close the row
        cands = [tok.decode(r[a:b]).decode() for r, (a, b) in zip(rows, spans)]
        assert len(set(cands)) == probes.CANDIDATES and all(c.isdigit() and len(c) == 5 for c in cands)
        assert all(r[:spans[0][0]] == rows[0][:spans[0][0]] for r in rows)  # only the value differs


def test_oracle_finds_every_fact_and_a_blind_model_none(pydoc):
    tok, val = pydoc
    for task, kw in (("needle", dict(depths=[0.0, 0.5, 1.0])), ("mqar", dict(pairs=[1, 3]))):
        r = probes.run_probe(Induction(), tok, val, task, lengths=[96, 160], trials=3, **kw)
        assert np.all(np.array(r["accuracy"]) == 1.0), r["accuracy"]
        assert r["chance"] == 0.1
        blind = probes.run_probe(Blind(), tok, val, task, lengths=[96], trials=2, **kw)
        assert np.all(np.array(blind["accuracy"]) == 0.0)


def test_a_short_memory_finds_near_facts_only(pydoc):
    tok, val = pydoc
    r = probes.run_probe(Induction(window=40), tok, val, "needle", lengths=[300], depths=[0.0, 1.0], trials=4)
    assert r["accuracy"] == [[0.0, 1.0]]


def test_cells_that_cannot_fit_are_not_numbers(pydoc):
    tok, val = pydoc
    r = probes.run_probe(Induction(), tok, val, "mqar", lengths=[64], pairs=[1, 8], trials=1)
    assert r["accuracy"][0][0] == 1.0 and r["accuracy"][0][1] is None
    with pytest.raises(probes.ProbeError, match="max_seq_len"):
        probes.run_probe(Induction(max_seq_len=64), tok, val, "needle", lengths=[128])


@pytest.mark.slow
def test_probe_command_on_paired_twins(tmp_path):
    pytest.importorskip("matplotlib")
    cli = [sys.executable, "-m", "diffattn.cli"]
    run = tmp_path / "pair"
    trained = subprocess.run(cli + ["paired", "--backend", "numpy", "--steps", "1", "--batch-size", "2",
                                    "--seq-len", "16", "--eval-batches", "1", "--out", str(run), "--no-progress"],
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    r = subprocess.run(cli + ["probe", str(run), "--task", "needle", "--depths", "0,1", "--trials", "1",
                              "--lengths", "48,64", "--out", str(tmp_path / "probe")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "probe" / "probe_needle.json").read_text())
    assert list(out["results"]) == ["diff", "vanilla"]
    assert (tmp_path / "probe" / "probe_needle.png").stat().st_size > 1000
    bad = subprocess.run(cli + ["probe", str(run), "--task", "sudoku"], capture_output=True, text=True)
    assert bad.returncode == 2 and "sudoku" in bad.stderr and bad.stderr.count("\n") == 1
