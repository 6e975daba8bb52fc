"""Decoding with a key/value cache (diffattn/decode.py, each backend's prefill / decode_step) against
the full forward of the numpy spec, and sampling (diffattn/generate.py).

The logits of a prompt prefilled and then extended one token at a time must equal, at every
position, spec.model_logits of the whole sequence. The spec's own cache path runs the same float64
math in another order: ~1e-16, bound 1e-10. A backend in float32 against the float64 spec: ~3e-7
measured, bound 1e-5 (float32's 6e-8 rounding over a tiny model's few dozen accumulations).
GQA (n_kv_heads < n_heads) is in every variant's cases.
"""
import numpy as np
import pytest

from diffattn import decode, spec
from diffattn.backend import BackendError, load
from diffattn.conformance import rel_err
from diffattn.config import preset
from diffattn.generate import Sampler, filtered_probs, generate
from diffattn.params import init_params

VARIANTS = ("vanilla", "diff", "diff_v2")
# (attention, n_kv_heads) of the tiny preset: MHA, and GQA where the variant has heads to group
CASES = [(a, kv) for a in VARIANTS for kv in (None, 1)]
PROMPT, TOTAL = 6, 19


def model_and_tokens(attention, kv, seed=0, batch=3):
    cfg = preset("tiny", attention=attention, n_kv_heads=kv)
    toks = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, (batch, TOTAL))
    return cfg, init_params(cfg, seed), toks


def incremental(model, toks, max_len=TOTAL + 3):
    """Logits (B, L, V): the first PROMPT tokens prefilled, then one decode step per token."""
    out = [model.prefill(toks[:, :PROMPT], max_len)]
    out += [model.decode_step(toks[:, t])[:, None] for t in range(PROMPT, toks.shape[1])]
    return np.concatenate(out, 1)


def worst_position(got, want):
    return max(rel_err(got[:, t], want[:, t]) for t in range(want.shape[1]))


@pytest.mark.parametrize("attention,kv", CASES)
def test_spec_cache_path_is_the_full_forward(attention, kv):
    cfg, params, toks = model_and_tokens(attention, kv)
    want = spec.model_logits(cfg, params, toks)
    cache = decode.new_cache(cfg, toks.shape[0], TOTAL)
    chunks = [(0, 1), (1, 5), (5, 6)] + [(t, t + 1) for t in range(6, TOTAL)]  # prefill in pieces too
    got = np.concatenate([decode.forward(cfg, params, toks[:, a:b], cache) for a, b in chunks], 1)
    assert cache.pos == TOTAL
    assert worst_position(got, want) <= 1e-10


def backends():
    out = [("numpy", "composed")]
    if __import__("importlib").util.find_spec("torch"):
        out += [("cuda", "composed"), ("cuda", "naive")]
    if __import__("importlib").util.find_spec("mlx"):
        out += [("mlx", "composed"), ("mlx", "naive")]
    return out


@pytest.mark.parametrize("backend,kernels", backends())
@pytest.mark.parametrize("attention,kv", CASES)
def test_backend_decode_equals_the_full_forward_float32(backend, kernels, attention, kv):
    cfg, params, toks = model_and_tokens(attention, kv)
    model = load(backend, device="cpu", dtype="float32",
                 kernels="auto" if backend == "numpy" else kernels).build(cfg, params)
    assert worst_position(incremental(model, toks), spec.model_logits(cfg, params, toks)) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in ("cuda", "mlx") if b in {n for n, _ in backends()}])
@pytest.mark.parametrize("attention", VARIANTS)
def test_bfloat16_decode_stays_in_the_bfloat16_band(backend, attention):
    # bf16 weights, activations and cache: 8 bits of mantissa rounded at every matmul input;
    # measured 3e-3..7e-3 (over all positions) against the float64 spec on the tiny model, bound 3e-2
    cfg, params, toks = model_and_tokens(attention, 1)
    model = load(backend, device="cpu", dtype="bfloat16").build(cfg, params)
    assert worst_position(incremental(model, toks), spec.model_logits(cfg, params, toks)) <= 3e-2


@pytest.mark.parametrize("attention", VARIANTS)
def test_cuda_float64_decode_is_the_spec_to_rounding(attention):
    pytest.importorskip("torch")
    cfg, params, toks = model_and_tokens(attention, 1)
    model = load("cuda", device="cpu", dtype="float64", kernels="composed").build(cfg, params)
    assert worst_position(incremental(model, toks), spec.model_logits(cfg, params, toks)) <= 1e-10


def test_a_second_prefill_restarts_the_cache():
    cfg, params, toks = model_and_tokens("diff", 1)
    model = load("numpy", dtype="float32").build(cfg, params)
    model.prefill(toks[:, ::-1][:, :PROMPT].copy(), TOTAL + 3)
    model.decode_step(toks[:, 0])
    assert worst_position(incremental(model, toks), spec.model_logits(cfg, params, toks)) <= 1e-5


# ---- cache size: what each variant holds per token ------------------------------------------

@pytest.mark.parametrize("kv", [None, 2])
def test_twins_cache_the_same_bytes_per_token_and_diff_holds_each_key_once(kv):
    vanilla = preset("small", attention="vanilla", n_kv_heads=kv)
    sizes = {}
    for att in VARIANTS:
        cfg = vanilla.twin(att)
        cache = decode.new_cache(cfg, batch=2, max_len=8, dtype=np.float32)
        held = sum(a.nbytes for a in cache.k + cache.v) // (2 * 8)  # bytes one row's position holds
        assert held == decode.cache_bytes_per_token(cfg, "float32")
        # keys: one head_dim vector per key head (DIFF: k1 and k2 of each kv head), not one per query head
        assert cache.k[0].shape[1:4:2] == (cfg.k_heads, cfg.head_dim)
        if kv is not None:
            assert cfg.k_heads < cfg.q_heads
        sizes[att] = held
    assert len(set(sizes.values())) == 1, sizes
    # vanilla's keys and values: 2 * n_kv_heads * head_dim per layer
    assert sizes["vanilla"] == vanilla.n_layers * 2 * vanilla.kv_heads * vanilla.head_dim * 4


def test_cuda_decoder_holds_what_the_spec_states():
    pytest.importorskip("torch")
    cfg, params, toks = model_and_tokens("diff", 1)
    model = load("cuda", device="cpu", dtype="float32", kernels="composed").build(cfg, params)
    model.prefill(toks[:, :PROMPT], 10)
    d = model.decoder
    held = sum(t.numel() * t.element_size() for t in d.k + d.v) // (toks.shape[0] * 10)
    assert held == d.bytes_per_token() == decode.cache_bytes_per_token(cfg, "float32")



def test_cuda_prefill_runs_the_kernel_options_the_model_was_built_with():
    """The decoder's prefill calls the training forward's op, so it takes the model's
    KernelOptions (backend options.kernel), not the defaults."""
    pytest.importorskip("torch")
    from backends.cuda.ops.paired.tuning import KernelOptions

    cfg, params, toks = model_and_tokens("diff", 1)
    chosen = KernelOptions(tma=False)
    model = load("cuda", device="cpu", dtype="float32", kernels="composed", kernel=chosen).build(cfg, params)
    model.prefill(toks[:, :PROMPT], 10)
    assert model.decoder.kernel_options == chosen != KernelOptions()

# ---- protocol errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", sorted({b for b, _ in backends()}))
def test_decode_errors_are_one_line(backend):
    cfg, params, toks = model_and_tokens("diff_v2", None)
    model = load(backend, device="cpu", dtype="float32").build(cfg, params)
    with pytest.raises(BackendError, match="prefill first"):
        model.decode_step(toks[:, 0])
    with pytest.raises(BackendError, match="max_seq_len"):
        model.prefill(toks, cfg.max_seq_len + 1)
    with pytest.raises(BackendError, match="shape|T>=1"):
        model.prefill(toks[0])  # one row without its batch axis
    model.prefill(toks[:, :4], 5)
    model.decode_step(toks[:, 4])
    with pytest.raises(BackendError, match="5"):
        model.decode_step(toks[:, 5])  # the cache of 5 positions is full


# ---- sampling ---------------------------------------------------------------------------------

def test_filtered_probs_top_k_and_top_p_by_hand():
    logits = np.log([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(filtered_probs(logits, Sampler(1.0).cfg), [[0.1, 0.2, 0.3, 0.4]], rtol=1e-12)
    np.testing.assert_allclose(filtered_probs(logits, Sampler(1.0, top_k=2).cfg), [[0, 0, 3 / 7, 4 / 7]], rtol=1e-12)
    # top-p 0.5: 0.4 alone falls short, 0.4 + 0.3 reaches it
    np.testing.assert_allclose(filtered_probs(logits, Sampler(1.0, top_p=0.5).cfg), [[0, 0, 3 / 7, 4 / 7]], rtol=1e-12)
    np.testing.assert_allclose(filtered_probs(logits, Sampler(1.0, top_p=0.4).cfg), [[0, 0, 0, 1]], rtol=1e-12)
    # temperature 0.5 squares the probabilities before normalising
    p2 = np.array([1, 4, 9, 16]) / 30
    np.testing.assert_allclose(filtered_probs(logits, Sampler(0.5).cfg), [p2], rtol=1e-12)


def test_draws_follow_the_filtered_distribution_and_repeat_by_seed():
    logits = np.tile(np.log([[0.1, 0.2, 0.3, 0.4]]), (20000, 1))
    draws = Sampler(1.0, top_k=3, seed=7)(logits)
    freq = np.bincount(draws, minlength=4) / len(draws)
    want = np.array([0, 2, 3, 4]) / 9
    assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / len(draws)) + 1e-12), freq
    assert np.array_equal(draws, Sampler(1.0, top_k=3, seed=7)(logits))
    assert not np.array_equal(draws, Sampler(1.0, top_k=3, seed=8)(logits))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 50))
    assert np.array_equal(Sampler(0)(logits), logits.argmax(-1))
    assert np.array_equal(Sampler(1.0, top_k=1, seed=3)(logits), logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5)])
def test_bad_sampler_settings(bad):
    with pytest.raises(ValueError):
        Sampler(**bad)


def test_generate_repeats_by_seed_and_both_torch_and_mlx_sample_alike():
    cfg, params, toks = model_and_tokens("diff", 1, batch=2)
    names = [b for b in ("cuda", "mlx") if __import__("importlib").util.find_spec("torch" if b == "cuda" else "mlx")]
    runs = {}
    for name in ["numpy"] + names:
        model = load(name, device="cpu", dtype="float32").build(cfg, params)
        runs[name] = generate(model, toks[:, :5], 12, Sampler(1.0, top_p=0.9, seed=11))
        again = generate(model, toks[:, :5], 12, Sampler(1.0, top_p=0.9, seed=11))
        assert np.array_equal(runs[name], again), name
    for name in names:
        assert np.array_equal(runs[name], runs["numpy"]), name
    # the sampled tokens are the model's: greedy decoding is the argmax of the full forward
    model = load("numpy", dtype="float32").build(cfg, params)
    seq = np.concatenate([toks[:, :5], generate(model, toks[:, :5], 6)], 1)
    assert np.array_equal(seq[:, 5:], spec.model_logits(cfg, params, seq[:, :-1])[:, 4:].argmax(-1))


def test_generate_refuses_more_than_the_context():
    cfg, params, toks = model_and_tokens("vanilla", None)
    model = load("numpy", dtype="float32").build(cfg, params)
    with pytest.raises(ValueError, match="context"):
        generate(model, toks[:, :10], cfg.max_seq_len)


def test_decode_table_smoke(tmp_path):
    pytest.importorskip("torch")
    from benchmarks.scripts import decode_table

    assert decode_table.main(["--smoke", "--no-hf", "--variants", "diff", "--batches", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "decode_table.md").read_text()
    assert "| diff | 2 |" in text and "device cpu" in text
    assert decode_table.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert decode_table.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert decode_table.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12


def test_bytes_per_step_counts_weights_once_and_the_cache_per_row():
    cfg = preset("stage1", attention="diff")
    per_token = cfg.n_layers * (cfg.k_heads * cfg.head_dim + cfg.kv_heads * cfg.v_head_dim) * 2
    assert decode.bytes_per_step(cfg, 16, 100) == cfg.num_params() * 2 + 16 * 100 * per_token
