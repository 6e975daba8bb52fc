"""The training harness: schedule, eval metrics, checkpoints, exact resume on every backend,
cross-backend resume, the NaN guard, paired runs. (Kills, full disks, locks and the other faults
a run folder survives: tests/test_faults.py.)

Tolerances: runs on one backend are compared for exact equality (same code, same batches, a
deterministic CPU). Across backends (both float32) the losses of a few tiny steps agree to
1e-4 nats, the cross-stack bound of `diffattn agree`."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffattn import backend as backend_mod
from diffattn import data, harness, optim, paired
from diffattn.config import ConfigError, ModelConfig, TrainConfig, preset
from diffattn.params import init_params

BACKENDS = ("numpy", "mlx", "cuda")
CROSS_TOL = 1e-4


def load_backend(name):
    try:
        return backend_mod.load(name, device="cpu", dtype=None if name == "numpy" else "float32")
    except backend_mod.BackendError as e:
        pytest.skip(f"backend {name} not importable here: {e}")


def tiny(attention="diff") -> ModelConfig:
    return preset("tiny", attention=attention, d_model=32, max_seq_len=16)


def tcfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, seq_len=16, steps=40, warmup_steps=4, eval_every=20, eval_batches=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pydoc():
    return data.load("builtin:pydoc")


def run(backend, out, pydoc, cfg=None, t=None, **kw):
    return harness.train(cfg or tiny(), t or tcfg(), pydoc, backend, out, progress=False, **kw)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---- exact resume --------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_resume_is_exact(name, tmp_path, pydoc):
    b = load_backend(name)
    straight = run(b, tmp_path / "a", pydoc)
    first = run(b, tmp_path / "b", pydoc, stop_after=20)
    assert first["stopped"] == "stop_after" and first["steps"] == 20
    second = run(b, tmp_path / "b", pydoc, resume_from=tmp_path / "b")
    assert second["steps"] == 40 and second["resumed_from"].endswith("step_000020")
    assert [straight["losses"][s] for s in range(40)] == \
        [first["losses"][s] for s in range(20)] + [second["losses"][s] for s in range(20, 40)]
    assert second["val_loss"] == straight["val_loss"]
    # the resumed run's metrics file reads as one uninterrupted run
    train = [m["loss"] for m in metrics(tmp_path / "b") if m["kind"] == "train"]
    assert train == [straight["losses"][s] for s in range(40)]


@pytest.mark.parametrize("src,dst", [("mlx", "cuda"), ("cuda", "mlx"), ("numpy", "cuda"), ("numpy", "mlx")])
def test_a_checkpoint_from_one_backend_resumes_on_another(src, dst, tmp_path, pydoc):
    a, b = load_backend(src), load_backend(dst)
    straight = run(b, tmp_path / "straight", pydoc, t=tcfg(steps=12, eval_every=6))
    run(a, tmp_path / "src", pydoc, t=tcfg(steps=12, eval_every=6), stop_after=6)
    moved = run(b, tmp_path / "dst", pydoc, t=tcfg(steps=12, eval_every=6), resume_from=tmp_path / "src")
    manifest = json.loads((Path(moved["checkpoint"]) / "manifest.json").read_text())
    assert manifest["resumed"]["backend"]["backend"] == src
    assert manifest["env"]["backend"]["backend"] == dst
    diffs = [abs(moved["losses"][s] - straight["losses"][s]) for s in range(6, 12)]
    assert max(diffs) <= CROSS_TOL


# ---- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_holds_everything_to_trace_the_run(tmp_path, pydoc):
    b = load_backend("numpy")
    s = run(b, tmp_path, pydoc, t=tcfg(steps=30, eval_every=10))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000020", "step_000030"]  # the previous good one kept, older ones gone
    params, opt, manifest, where = harness.load_checkpoint(tmp_path)
    assert where.name == "step_000030" and manifest["step"] == 30 and opt["step"] == 30
    assert manifest["model_config"] == harness.config_dict(tiny())
    assert manifest["train_config"]["steps"] == 30 and manifest["seed"] == 0 and manifest["data_seed"] == 0
    assert manifest["data"]["name"] == "builtin:pydoc" and manifest["data_position"]["step"] == 30
    assert manifest["env"]["backend"]["backend"] == "numpy" and manifest["env"]["python"]
    assert "git_commit" in manifest["env"] and manifest["tokens_seen"] == 30 * 2 * 16
    state_params, _ = b.build(tiny(), params).state()
    assert all(np.array_equal(state_params[k], params[k]) for k in params)
    assert s["checkpoint"] == str(where)


def test_corrupt_or_mismatched_checkpoints_are_one_line_errors(tmp_path, pydoc):
    b = load_backend("numpy")
    run(b, tmp_path / "r", pydoc, t=tcfg(steps=4, eval_every=4))
    ck = tmp_path / "r" / "checkpoints" / "step_000004"
    raw = (ck / "params.safetensors").read_bytes()
    (ck / "params.safetensors").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(harness.CheckpointError, match="sha256") as e:
        harness.load_checkpoint(tmp_path / "r")
    assert "\n" not in str(e.value)
    (ck / "params.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(harness.CheckpointError):
        harness.load_checkpoint(tmp_path / "r")
    (ck / "params.safetensors").write_bytes(raw)
    with pytest.raises(harness.CheckpointError, match="model d_model"):
        run(b, tmp_path / "other", pydoc, cfg=preset("tiny", d_model=64, max_seq_len=16),
            t=tcfg(steps=8, eval_every=4), resume_from=tmp_path / "r")
    assert not (tmp_path / "other").exists()  # nothing written for bad input
    with pytest.raises(harness.CheckpointError, match="lr"):
        run(b, tmp_path / "other", pydoc, t=tcfg(steps=8, eval_every=4, lr=1e-3), resume_from=tmp_path / "r")
    with pytest.raises(harness.CheckpointError, match="no checkpoint"):
        harness.load_checkpoint(tmp_path)


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, pydoc):
    b = load_backend("numpy")
    run(b, tmp_path, pydoc, t=tcfg(steps=2, eval_every=2))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(harness.ConfigError, match="already holds a run"):
        run(b, tmp_path, pydoc, t=tcfg(steps=2, eval_every=2))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path, pydoc):
    cfg = preset("tiny", d_model=32, max_seq_len=16, n_layers=10 ** 8)  # ~1.6e12 parameters
    with pytest.raises(ConfigError, match="more than this machine's"):
        run(load_backend("numpy"), tmp_path / "run", pydoc, cfg=cfg)
    assert not (tmp_path / "run").exists()


# ---- the NaN guard ----------------------------------------------------------------------------

class PoisonedBackend:
    """Wraps a backend; from step `at` on, the loss handle reads NaN (as a diverged model would)."""

    def __init__(self, inner, at):
        self.inner, self.at = inner, at
        self.name, self.device, self.dtype, self.kernels = inner.name, inner.device, inner.dtype, inner.kernels

    def build(self, cfg, params, optim=None):
        model, at = self.inner.build(cfg, params, optim=optim), self.at
        real_step = model.train_step
        count = {"n": 0}

        def train_step(batch, lr):
            loss = real_step(batch, lr)
            count["n"] += 1
            return float("nan") if count["n"] > at else loss

        model.train_step = train_step
        return model

    def describe(self):
        return self.inner.describe()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, pydoc):
    b = PoisonedBackend(load_backend("numpy"), at=13)
    with pytest.raises(harness.Diverged) as e:
        run(b, tmp_path, pydoc, t=tcfg(steps=40, eval_every=5))
    msg = str(e.value)
    assert "\n" not in msg and "nan at step 13" in msg and "step_000010" in msg
    params, _, manifest, _ = harness.load_checkpoint(tmp_path)
    assert manifest["step"] == 10 and all(np.isfinite(v).all() for v in params.values())
    assert metrics(tmp_path)[-1] == {"kind": "stop", "step": 13, "reason": "diverged", "loss": "nan"}


# ---- schedule, accumulation, budget, eval -----------------------------------------------------

class RecordingBackend(PoisonedBackend):
    """Wraps a backend and records every (batch, lr) given to train_step."""

    def __init__(self, inner):
        super().__init__(inner, at=10 ** 9)
        self.calls = []

    def build(self, cfg, params, optim=None):
        model = self.inner.build(cfg, params, optim=optim)
        real_step = model.train_step

        def train_step(batch, lr):
            self.calls.append((np.array(batch), lr))
            return real_step(batch, lr)

        model.train_step = train_step
        return model


def test_batches_lr_and_accumulation_follow_the_spec(tmp_path, pydoc):
    b = RecordingBackend(load_backend("numpy"))
    t = tcfg(steps=6, warmup_steps=2, eval_every=6, grad_accum=3)
    run(b, tmp_path, pydoc, t=t)
    assert len(b.calls) == 6
    for step, (batch, lr) in enumerate(b.calls):
        assert batch.shape == (3, 2, 17)
        assert np.array_equal(batch, pydoc.train_batch(step, 2, 16, 3, t.data_seed))
        assert lr == optim.lr_at(step, t)
    logged = [m["lr"] for m in metrics(tmp_path) if m["kind"] == "train"]
    assert logged == [optim.lr_at(s, t) for s in range(6)]


def test_budget_mode_stops_on_time_and_decays_on_time(tmp_path, pydoc):
    b = RecordingBackend(load_backend("numpy"))
    t = tcfg(steps=10 ** 6, warmup_steps=2, eval_every=10 ** 6)
    s = run(b, tmp_path, pydoc, t=t, budget_s=1.0)
    assert s["stopped"] == "budget" and 0.99 <= s["train_seconds"] < 5 and s["steps"] == len(b.calls) > 2
    lrs = [lr for _, lr in b.calls]
    assert lrs[:2] == [optim.lr_at(0, t), optim.lr_at(1, t)]
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:]))  # cosine on elapsed time: never rises
    assert lrs[-1] < t.lr


def test_eval_reports_bpb_and_loss_by_position(pydoc):
    b = load_backend("numpy")
    cfg, t = tiny(), tcfg(eval_batches=3)
    model = b.build(cfg, init_params(cfg, 0))
    ev = harness.evaluate(model, pydoc, t)
    losses = np.concatenate([model.token_losses(tok) for tok, _ in pydoc.val_batches(2, 16, 3)])
    assert ev["val_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    assert ev["val_bpb"] == pytest.approx(losses.mean() / math.log(2), rel=1e-12)  # bytes = tokens
    assert ev["position_bins"] == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10], [10, 12], [12, 14], [14, 16]]
    assert ev["loss_by_position"] == pytest.approx(losses.reshape(-1, 8, 2).mean(axis=(0, 2)).tolist(), rel=1e-12)


def test_eval_bpb_divides_by_true_bytes_with_bpe():
    d = data.load("builtin:pydoc", "bpe:300")
    cfg = preset("tiny", d_model=32, vocab_size=300, max_seq_len=16)
    model = load_backend("numpy").build(cfg, init_params(cfg, 0))
    t = tcfg(eval_batches=2)
    ev = harness.evaluate(model, d, t)
    batches = d.val_batches(2, 16, 2)
    nats = sum(model.token_losses(tok).sum() for tok, _ in batches)
    n_bytes = sum(len(d.tokenizer.decode(tok[:, 1:].ravel())) for tok, _ in batches)
    assert ev["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-12)


class OracleModel:
    """Puts all logit mass on the true next token at answer positions (and on token 0 elsewhere)."""

    def __init__(self, vocab, batches):
        self.vocab, self.answers = vocab, {b[0].tobytes(): b for b in batches}

    def token_losses(self, tokens):
        return np.ones(tokens[:, 1:].shape)

    def logits(self, inputs):
        out = np.zeros(inputs.shape + (self.vocab,))
        for tok, mask in self.answers.values():
            if np.array_equal(tok[:, :-1], inputs):
                b, t = np.nonzero(mask)
                out[b, t, tok[:, 1:][mask]] = 1.0
        return out


def test_retrieval_accuracy_counts_only_answer_positions():
    task = data.load("builtin:recall")
    t = tcfg(seq_len=32, eval_batches=2)
    oracle = OracleModel(256, task.val_batches(2, 32, 2, t.data_seed))
    assert harness.evaluate(oracle, task, t)["accuracy"] == 1.0
    oracle.answers = {}  # now argmax is token 0, never a value (values are 128..255)
    ev = harness.evaluate(oracle, task, t)
    assert ev["accuracy"] == 0.0 and ev["val_bpb"] is None


# ---- paired runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["diff", "diff_v2"])
def test_paired_run_checks_shared_tensors_and_reports_deltas(attention, tmp_path, pydoc):
    b = RecordingBackend(load_backend("numpy"))
    cfg = preset("tiny", attention=attention, d_model=32, max_seq_len=16)
    r = paired.run_paired(cfg, tcfg(steps=4, eval_every=4), pydoc, b, tmp_path, progress=False)
    shared = json.loads((tmp_path / "seed_0" / "shared.json").read_text())
    assert json.loads((tmp_path / "paired.json").read_text())["per_seed"][0]["shared"]["count"] == shared["count"]
    assert shared["byte_identical_at_init"] is True and shared["byte_identical_in_backend_at_step0"] is True
    expect = {"embed.weight", "norm.weight", "layers.0.attn.q_proj.weight", "layers.1.mlp.w2.weight"}
    if attention == "diff":
        expect |= {"layers.0.attn.k_proj.weight", "layers.0.attn.v_proj.weight", "layers.0.attn.out_proj.weight"}
    assert expect - {"layers.0.attn.q_proj.weight"} <= set(shared["names"]) if attention == "diff_v2" \
        else expect <= set(shared["names"])
    assert "layers.0.attn.lambda_q1" in shared["diff_only"] or attention == "diff_v2"
    r = r["per_seed"][0]
    assert r["delta"]["val_loss"] == r["diff"]["val_loss"] - r["vanilla"]["val_loss"]
    assert r["delta"]["loss_by_position"] == [a - v for a, v in zip(r["diff"]["loss_by_position"],
                                                                     r["vanilla"]["loss_by_position"])]
    # the two variants saw the same batches, step for step
    diff_batches, van_batches = b.calls[:4], b.calls[4:]
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(diff_batches, van_batches))
    manifest = json.loads((tmp_path / "paired.json").read_text())
    assert manifest["summary"]["val_loss"]["mean"] == r["delta"]["val_loss"]
    assert "val loss" in paired.format_paired(manifest)


def test_paired_refuses_a_folder_holding_a_train_run(tmp_path, pydoc):
    run(load_backend("numpy"), tmp_path, pydoc, t=tcfg(steps=2, eval_every=2))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds a train run"):
        paired.run_paired(tiny(), tcfg(steps=2, eval_every=2), pydoc, load_backend("numpy"), tmp_path, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_paired_run_on_a_retrieval_task_reports_the_accuracy_delta(tmp_path):
    b = load_backend("numpy")
    cfg = preset("tiny", d_model=32, max_seq_len=32)
    r = paired.run_paired(cfg, tcfg(steps=2, seq_len=32, eval_every=2), data.load("builtin:recall"), b,
                          progress=False)["per_seed"][0]
    assert r["delta"]["accuracy"] == r["diff"]["accuracy"] - r["vanilla"]["accuracy"]
    assert r["delta"]["val_bpb"] is None


def test_agree_reports_logit_and_loss_differences():
    a, b = load_backend("mlx"), load_backend("cuda")
    cfg = preset("tiny", max_seq_len=32)
    r = paired.run_agree(cfg, tcfg(steps=5, seq_len=32, warmup_steps=1), data.load("builtin:pydoc"), (a, b))
    assert len(r["per_step"]) == 5 and r["ok"]
    assert r["logits_rel_err"] <= paired.AGREE_LOGITS_REL and r["max_abs_loss_diff"] <= paired.AGREE_LOSS_ABS
