"""Multi-seed paired runs: per-seed twins, statistics over seeds, and a killed run that resumes
to exactly what an uninterrupted one writes (numpy backend, float64: a resumed run is bitwise
the straight one, so results are compared for equality)."""
import json
from pathlib import Path

import numpy as np
import pytest

from diffattn import backend as backend_mod
from diffattn import data, paired, stats
from diffattn.config import ConfigError, TrainConfig, preset

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def pydoc():
    return data.load("builtin:pydoc")


def cfg():
    return preset("tiny", d_model=32, max_seq_len=16)


def tcfg(**kw):
    # checkpoints (every eval) at steps 2 and 4
    return TrainConfig(**{**dict(batch_size=2, seq_len=16, steps=4, warmup_steps=1, eval_every=2, eval_batches=1,
                                 lr=1e-2), **kw})


def numpy_backend():
    return backend_mod.load("numpy")


class Killed(Exception):
    """Stands for the process dying mid-run."""


class KillingData:
    """pydoc, but the n-th request for the batch of (data_seed, step) raises Killed."""

    def __init__(self, inner, data_seed, step, nth):
        self.inner, self.at, self.nth, self.seen = inner, (data_seed, step), nth, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_batch(self, step, batch_size, seq_len, n_micro=1, seed=0):
        if (seed, step) == self.at:
            self.seen += 1
            if self.seen == self.nth:
                raise Killed(f"killed at data seed {seed}, step {step}")
        return self.inner.train_batch(step, batch_size, seq_len, n_micro, seed)


def test_parse_seeds():
    assert paired.parse_seeds("0-7") == list(range(8))
    assert paired.parse_seeds("0,3,5") == [0, 3, 5] and paired.parse_seeds("0-2, 9") == [0, 1, 2, 9]
    for bad in ("", "a", "3-1", "0,0", "-1"):
        with pytest.raises(ConfigError):
            paired.parse_seeds(bad)


@pytest.mark.slow
def test_seeds_drive_init_and_data_order_and_the_summary_is_over_seeds(tmp_path, pydoc):
    r = paired.run_paired(cfg(), tcfg(), pydoc, numpy_backend(), tmp_path, seeds=SEEDS, progress=False)
    assert [p["seed"] for p in r["per_seed"]] == SEEDS and [p["data_seed"] for p in r["per_seed"]] == SEEDS
    runs = {s: json.loads((tmp_path / f"seed_{s}" / "diff" / "run.json").read_text()) for s in SEEDS}
    assert [(runs[s]["seed"], runs[s]["data_seed"]) for s in SEEDS] == [(0, 0), (1, 1), (2, 2)]
    deltas = [p["delta"]["val_loss"] for p in r["per_seed"]]
    assert len(set(deltas)) == 3  # three different experiments
    for p in r["per_seed"]:
        assert p["delta"]["val_loss"] == p["diff"]["val_loss"] - p["vanilla"]["val_loss"]
        assert p["delta"]["val_bpb"] == p["diff"]["val_bpb"] - p["vanilla"]["val_bpb"]
        assert [e["step"] for e in p["evals"]] == [2, 4] and p["evals"][-1]["val_loss"] == p["delta"]["val_loss"]
    s = r["summary"]
    assert s["val_loss"] == stats.summarize(deltas)
    assert s["val_loss"]["t_interval"][0] < s["val_loss"]["mean"] < s["val_loss"]["t_interval"][1]
    bins = np.array([p["delta"]["loss_by_position"] for p in r["per_seed"]])
    assert [b["mean"] for b in s["loss_by_position"]] == pytest.approx(bins.mean(0).tolist(), abs=1e-15)
    assert [e["step"] for e in s["evals"]] == [2, 4]
    on_disk = json.loads((tmp_path / "paired.json").read_text())
    assert on_disk["complete"] and on_disk["summary"] == json.loads(json.dumps(s))
    # a fixed data seed: the same batches for every seed, init still differs
    fixed = paired.run_paired(cfg(), tcfg(), pydoc, numpy_backend(), None, seeds=[0, 1], data_seed=7, progress=False)
    assert [p["data_seed"] for p in fixed["per_seed"]] == [7, 7] and fixed["data_seed"] == 7


def test_an_existing_run_needs_resume(tmp_path, pydoc):
    paired.run_paired(cfg(), tcfg(steps=2), pydoc, numpy_backend(), tmp_path, seeds=[0], progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        paired.run_paired(cfg(), tcfg(steps=2), pydoc, numpy_backend(), tmp_path, seeds=[0], progress=False)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_multi_seed_run_resumes_to_the_uninterrupted_result(tmp_path, pydoc):
    straight = paired.run_paired(cfg(), tcfg(), pydoc, numpy_backend(), tmp_path / "a", seeds=SEEDS, progress=False)
    out = tmp_path / "b"
    # killed in seed 1's vanilla arm at step 3: its diff arm has finished, vanilla has the step-2 checkpoint
    with pytest.raises(Killed):
        paired.run_paired(cfg(), tcfg(), KillingData(pydoc, 1, 3, nth=2), numpy_backend(), out, seeds=SEEDS,
                          progress=False)
    assert (out / "seed_1" / "diff" / "arm.json").is_file() and not (out / "seed_1" / "vanilla" / "arm.json").exists()
    assert json.loads((out / "seed_1" / "vanilla" / "checkpoints" / "latest.json").read_text())["step"] == 2
    partial = json.loads((out / "paired.json").read_text())
    assert not partial["complete"] and [p["seed"] for p in partial["per_seed"]] == [0]
    seed0 = snapshot(out / "seed_0")
    seed1_diff = snapshot(out / "seed_1" / "diff")
    r = paired.run_paired(cfg(), tcfg(), pydoc, numpy_backend(), out, seeds=SEEDS, resume=True, progress=False)
    assert snapshot(out / "seed_0") == seed0 and snapshot(out / "seed_1" / "diff") == seed1_diff  # kept as they were
    assert r["per_seed"][1]["vanilla"]["resumed_from"].endswith("step_000002")
    assert r["per_seed"][2]["diff"]["resumed_from"] is None
    for a, b in zip(straight["per_seed"], r["per_seed"]):
        assert a["delta"] == b["delta"] and a["evals"] == b["evals"]
    assert r["summary"] == straight["summary"]


def test_an_arm_killed_before_its_first_interval_checkpoint_resumes_from_step_0(tmp_path, pydoc):
    straight = paired.run_paired(cfg(), tcfg(), pydoc, numpy_backend(), None, seeds=[0], progress=False)
    with pytest.raises(Killed):  # diff arm of seed 0, step 1: before the step-2 checkpoint
        paired.run_paired(cfg(), tcfg(), KillingData(pydoc, 0, 1, nth=1), numpy_backend(), tmp_path, seeds=[0],
                          progress=False)
    assert (tmp_path / "seed_0" / "diff" / "run.json").is_file()
    assert json.loads((tmp_path / "seed_0" / "diff" / "checkpoints" / "latest.json").read_text())["step"] == 0
    r = paired.run_paired(cfg(), tcfg(), pydoc, numpy_backend(), tmp_path, seeds=[0], resume=True, progress=False)
    assert r["per_seed"][0]["diff"]["resumed_from"].endswith("step_000000")
    assert r["per_seed"][0]["delta"] == straight["per_seed"][0]["delta"]


def test_report_draws_loss_and_delta_by_position_of_a_paired_run(tmp_path, pydoc, capsys):
    pytest.importorskip("matplotlib")
    from diffattn import report

    paired.run_paired(cfg(), tcfg(steps=2), pydoc, numpy_backend(), tmp_path / "p", seeds=[0, 1], progress=False)
    assert report.main(["--paired", str(tmp_path / "p"), "--plots", str(tmp_path / "plots")]) == 0
    png = tmp_path / "plots" / "paired_by_position_p.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in capsys.readouterr().out
    assert report.main(["--paired", str(tmp_path / "plots"), "--plots", str(tmp_path / "plots")]) == 2
    assert "no paired.json" in capsys.readouterr().err


def test_every_seed_trains_both_arms_under_the_recipe_and_records_it(tmp_path, pydoc):
    """--optimizer and --packing reach both arms of every seed, each seed on its own data_seed;
    shared.json and paired.json record the recipe, and a resume under another recipe is refused
    before anything trains."""
    t = tcfg(optimizer="muon", packing="bos-best-fit")
    r = paired.run_paired(cfg(), t, pydoc, numpy_backend(), tmp_path, seeds=[0, 1], progress=False)
    assert (r["optimizer"], r["packing"]) == ("muon", "bos-best-fit")
    on_disk = json.loads((tmp_path / "paired.json").read_text())
    assert (on_disk["optimizer"], on_disk["packing"]) == ("muon", "bos-best-fit")
    assert "4 muon steps" in paired.format_paired(r) and "bos-best-fit batches" in paired.format_paired(r)
    for s in (0, 1):
        shared = json.loads((tmp_path / f"seed_{s}" / "shared.json").read_text())
        assert (shared["optimizer"], shared["packing"]) == ("muon", "bos-best-fit")
        for arm in ("diff", "vanilla"):
            run = json.loads((tmp_path / f"seed_{s}" / arm / "run.json").read_text())
            assert run["train_config"]["optimizer"] == "muon" and run["data"]["packing"] == "bos-best-fit"
            assert run["data_seed"] == s
    with pytest.raises(ConfigError, match="seed 0 ran with --optimizer muon, this run --optimizer adamw"):
        paired.run_paired(cfg(), tcfg(packing="bos-best-fit"), pydoc, numpy_backend(), tmp_path, seeds=[0, 1],
                          resume=True, progress=False)
