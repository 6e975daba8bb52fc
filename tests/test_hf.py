"""Hugging Face interop (diffattn/hf): import, output-preserving conversion, export, diagnostics.

Tiny random transformers models are built here (no download). The oracle of import and export is
transformers' own forward; of conversion and of the backends' lambda_mix, the numpy spec.
Tolerances: 1e-5 relative, float32 forwards (transformers', the exported model's) against each
other or the float64 spec; the zero-init lambda is 0 to float32 rounding of one vector (~1e-7).
Weights are drawn with std 0.2 so that attention maps are far from uniform: a wrong RoPE row
order then moves the logits by far more than the tolerance (checked below).
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffattn import backend, diagnostics, hf, spec  # noqa: E402
from diffattn.cli import main  # noqa: E402
from diffattn.config import ConfigError, preset  # noqa: E402
from diffattn.hf import convert  # noqa: E402
from diffattn.numerics import rel_error  # noqa: E402
from diffattn.params import init_params  # noqa: E402

TOL = 1e-5
VOCAB = 300


def tiny_hf(kind="llama", tie=False, **over):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
              tie_word_embeddings=tie, initializer_range=0.2)
    kw.update(over)
    torch.manual_seed(0)
    model = cls[1](cls[0](**kw)).float().eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so a lost norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.double().numpy()


rel = rel_error  # ||a - b|| / ||b||


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True)])
def test_import_matches_transformers(tmp_path, kind, tie):
    model = tiny_hf(kind, tie)
    cfg, params, notes = hf.read_hf(save(model, tmp_path / "m"))
    assert (cfg.n_heads, cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (4, 2, tie, 500.0, 1e-5)
    assert rel(spec.model_logits(cfg, params, TOKENS), hf_logits(model, TOKENS)) < TOL


def test_rope_row_order_matters(tmp_path):
    """Without the rotate_half -> interleaved row permutation the logits are far off: the test above
    can fail."""
    model = tiny_hf()
    cfg, params, _ = hf.read_hf(save(model, tmp_path / "m"))
    undo = {k: (v[np.argsort(hf.interleave_rows(v.shape[0] // cfg.head_dim, cfg.head_dim))]
                if k.endswith(("q_proj.weight", "k_proj.weight")) else v) for k, v in params.items()}
    assert rel(spec.model_logits(cfg, undo, TOKENS), hf_logits(model, TOKENS)) > 1e-2


def test_import_sharded_and_cli_keeps_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_hf()
    src = save(model, tmp_path / "m", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(src)
    assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    cfg, params, manifest = hf.read_run(tmp_path / "run")
    assert manifest["origin"]["architecture"] == "LlamaForCausalLM"
    assert rel(spec.model_logits(cfg, params, TOKENS), hf_logits(model, TOKENS)) < TOL
    kept = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / hf.TOKENIZER_DIR)
    assert kept("hello world")["input_ids"] == [1, 2]


def test_import_refusals(tmp_path, capsys):
    qwen = tiny_hf("qwen2")
    with torch.no_grad():
        qwen.model.layers[0].self_attn.q_proj.bias.fill_(0.1)
    with pytest.raises(hf.HFError, match="nonzero bias"):
        hf.read_hf(save(qwen, tmp_path / "q"))
    with pytest.raises(hf.HFError, match="RoPE scaling 'linear'"):
        hf.read_hf(save(tiny_hf(rope_scaling={"rope_type": "linear", "factor": 2.0}), tmp_path / "s"))
    with pytest.raises(hf.HFError, match="head_dim=32"):
        hf.read_hf(save(tiny_hf(head_dim=32), tmp_path / "h"))
    cfg, _, notes = hf.read_hf(save(tiny_hf("mistral", sliding_window=16), tmp_path / "w"))
    assert cfg.max_seq_len == 16 and notes["max_seq_len_capped_at_sliding_window"] == 16
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["import", str(tmp_path / "gpt2"), "--out", str(tmp_path / "r")]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffattn")]
    assert len(ours) == 1 and "not supported" in ours[0] and not (tmp_path / "r").exists()


@pytest.mark.parametrize("sublayer_norm,mirror", [(False, False), (False, True)])
def test_zero_init_double_heads_is_the_same_function(sublayer_norm, mirror):
    van = preset("tiny", attention="vanilla", n_kv_heads=1, init_std=0.3)
    params = init_params(van, 0)
    cfg, out = convert.to_diff(van, params, zero_init=True, mirror_weights=mirror, sublayer_norm=sublayer_norm)
    assert (cfg.attention, cfg.diff_heads, cfg.diff_subln, cfg.head_dim) == ("diff", "double", False, van.head_dim)
    for i in range(cfg.n_layers):
        lam = spec.diff_lambda(cfg, i, {k.split(".attn.")[1]: v.astype(np.float64) for k, v in out.items()
                                        if k.startswith(f"layers.{i}.attn.")})[0]
        assert abs(lam) < 1e-6
        assert all(np.any(out[f"layers.{i}.attn.{n}"] != 0) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
    ref = spec.model_logits(van, params, TOKENS % 256, np.float32)
    assert rel(spec.model_logits(cfg, out, TOKENS % 256, np.float32), ref) < TOL


def test_conversions_that_change_the_function():
    """sublayer norm, no zero-init, split heads and V2 (sigmoid lambda) all differ from the original."""
    van = preset("tiny", attention="vanilla", init_std=0.3)
    params = init_params(van, 0)
    ref = spec.model_logits(van, params, TOKENS % 256)
    for kw in (dict(zero_init=True, sublayer_norm=True), dict(), dict(heads="split", zero_init=True),
               dict(to="diff_v2", zero_init=True)):
        cfg, out = convert.to_diff(van, params, **kw)
        assert rel(spec.model_logits(cfg, out, TOKENS % 256), ref) > 1e-3, kw
    split_cfg, split = convert.to_diff(van, params, heads="split")
    assert split_cfg.n_heads == van.n_heads // 2 and split["layers.0.attn.q_proj.weight"] is not None
    assert np.array_equal(split["layers.0.attn.q_proj.weight"], params["layers.0.attn.q_proj.weight"])
    with pytest.raises(ConfigError, match="split-heads needs even"):
        convert.to_diff(preset("tiny", attention="vanilla", n_heads=1, d_model=64), init_params(
            preset("tiny", attention="vanilla", n_heads=1, d_model=64)), heads="split")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cuda", "mlx"])
def test_backends_run_converted_layouts_with_lambda_mix(name):
    """Each backend's logits, gradients and (compiled) training-step loss at a lambda_mix match the spec's."""
    try:
        be = backend.load(name, device="cpu", dtype="float32", kernels="composed")
    except backend.BackendError as e:
        pytest.skip(str(e))
    van = preset("tiny", attention="vanilla", init_std=0.3)
    for kw in (dict(), dict(to="diff_v2")):
        cfg, params = convert.to_diff(van, init_params(van, 0), **kw)
        model = be.build(cfg, params)
        batch = TOKENS[:, :17] % 256
        for mix in (0.25, 1.0):
            model.set_lambda_mix(mix)
            assert rel(model.logits(batch[:, :-1]), spec.model_logits(cfg, params, batch[:, :-1], lambda_mix=mix)) < TOL
            loss, grads = model.loss_and_grads(batch)
            ref_loss, ref = spec.model_loss_and_grads(cfg, params, batch, lambda_mix=mix)
            assert abs(loss - ref_loss) < TOL * ref_loss
            assert rel(grads["layers.1.attn.lambda_q2" if kw == {} else "layers.1.attn.lambda_proj.weight"],
                       ref["layers.1.attn.lambda_q2" if kw == {} else "layers.1.attn.lambda_proj.weight"]) < 1e-4
        model.set_lambda_mix(0.5)  # the compiled step reads the new value
        assert abs(float(model.train_step(batch, 0.0)) - spec.model_loss_and_grads(cfg, params, batch, lambda_mix=0.5)[0]) < 1e-5


def test_export_vanilla_roundtrip(tmp_path):
    model = tiny_hf(tie=True)
    run = tmp_path / "run"
    assert main(["import", str(save(model, tmp_path / "m")), "--out", str(run)]) == 0
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    assert rel(hf_logits(back, TOKENS), hf_logits(model, TOKENS)) < TOL
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "out")]) == 2  # not empty: refused


@pytest.mark.parametrize("to", ["diff", "diff_v2"])
def test_export_diff_trust_remote_code(tmp_path, to):
    van = preset("tiny", attention="vanilla", init_std=0.3)
    cfg, params = convert.to_diff(van, init_params(van, 0), to=to, sublayer_norm=True)
    hf.write_run(tmp_path / "run", cfg, params, {"kind": "test"})
    assert main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "out")]) == 0
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).float().eval()
    assert rel(hf_logits(m, TOKENS % 256), spec.model_logits(cfg, params, TOKENS % 256)) < TOL


def test_diagnostics_against_their_definitions():
    van = preset("tiny", attention="vanilla", init_std=0.3)
    cfg, params = convert.to_diff(van, init_params(van, 0))
    tokens = TOKENS[:, :12] % 256
    rec = diagnostics.diagnose(cfg, params, tokens, [0, 1], lambda_mix=0.5)
    c = spec.attention_caches(cfg, params, tokens, lambda_mix=0.5)[1]
    p1, p2 = c["p1"], c["p2"]
    lam = float(spec.diff_lambda(cfg, 1, {k.split(".attn.")[1]: v.astype(np.float64) for k, v in params.items()
                                          if k.startswith("layers.1.attn.")})[0])
    d = np.abs(p1 - 0.5 * lam * p2)
    d /= d.sum(-1, keepdims=True)
    ent = lambda p: float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)))  # noqa: E731
    fig = rec["layers"]["1"]
    assert fig["lambda"] == pytest.approx(lam, rel=1e-12)
    assert fig["entropy_pos"] == pytest.approx(ent(p1), rel=1e-12)
    assert fig["entropy_diff"] == pytest.approx(ent(d), rel=1e-12)
    v = np.repeat(c["v"], cfg.n_heads // cfg.kv_heads, 1)
    neg, pos = 0.5 * lam * (p2 @ v), p1 @ v
    assert fig["neg_ratio"] == pytest.approx(np.linalg.norm(neg) / np.linalg.norm(pos), rel=1e-9)
    assert diagnostics.strided_layers(13, 3) == [0, 6, 12]


@pytest.mark.slow
def test_convert_then_finetune_with_warmup_and_diagnostics(tmp_path):
    """import -> convert --zero-init -> train --resume-from with a lambda warmup and --diag-every:
    the diag records appear, lambda_mix ramps, and the report plots them."""
    src = save(tiny_hf(vocab_size=256, initializer_range=0.02), tmp_path / "m")
    assert main(["import", str(src), "--out", str(tmp_path / "a")]) == 0
    assert main(["convert", str(tmp_path / "a"), "--to", "diff", "--zero-init", "--out", str(tmp_path / "b")]) == 0
    args = ["train", "--backend", "cuda", "--device", "cpu", "--resume-from", str(tmp_path / "b"), "--steps", "6",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "6", "--eval-batches", "1", "--lambda-warmup", "4",
            "--diag-every", "2", "--out", str(tmp_path / "c"), "--no-progress"]
    try:
        backend.load("cuda", device="cpu")
    except backend.BackendError:
        args[2] = "numpy"
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == [0, 2, 4, 6]
    assert [r["lambda_mix"] for r in diag] == [0.0, 0.5, 1.0, 1.0]
    assert abs(diag[0]["layers"]["0"]["lambda"]) < 1e-6 and diag[0]["layers"]["1"]["neg_norm"] == 0.0
    pytest.importorskip("matplotlib")
    from diffattn import report

    assert any(p.name.startswith("diag_") for p in report.plot_runs([tmp_path / "c"], tmp_path / "plots"))


def test_lambda_warmup_refusals(tmp_path):
    from diffattn import harness
    from diffattn.config import TrainConfig
    from diffattn.data import load

    tcfg = TrainConfig(batch_size=2, seq_len=16, steps=2, eval_every=2, eval_batches=1, lambda_warmup_steps=2)
    with pytest.raises(ConfigError, match="vanilla model has no negative map"):
        harness.train(preset("tiny", attention="vanilla"), tcfg, load("builtin:pydoc"), backend.load("numpy"),
                      tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_missing_diagnostics_sink_is_refused_before_writing(tmp_path):
    import importlib.util

    from diffattn import harness
    from diffattn.config import TrainConfig
    from diffattn.data import load

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: nothing to refuse")
    tcfg = TrainConfig(batch_size=2, seq_len=16, steps=2, eval_every=2, eval_batches=1)
    with pytest.raises(ConfigError, match="needs wandb"):
        harness.train(preset("tiny"), tcfg, load("builtin:pydoc"), backend.load("numpy"), tmp_path / "r",
                      progress=False, diag_every=1, diag_log=("wandb",))
    assert not (tmp_path / "r").exists()
