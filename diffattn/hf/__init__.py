"""Hugging Face interop: Llama-family checkpoints in and out, as a mapping of tensors (numpy only).

    cfg, params, info = read_hf(HF_DIR)          a local LlamaForCausalLM / MistralForCausalLM /
                                                 Qwen2ForCausalLM folder -> a vanilla model
    write_hf(cfg, params, OUT_DIR)                vanilla -> a LlamaForCausalLM folder (no custom code);
                                                 DIFF -> config + modeling_diffattn.py (trust_remote_code)
    diffattn.hf.convert.to_diff(cfg, params, ...) vanilla -> DIFF V1 / V2 (diffattn/hf/convert.py)

What differs between the two layouts, and how it is handled:

- RoPE. Transformers rotates each head's coordinate pairs (i, i + d/2) (`rotate_half`); the spec
  rotates (2i, 2i+1), by the same angle pos * theta^(-2i/d). Attention only uses q . k, which a
  permutation applied to both q and k leaves unchanged, so import permutes the rows of q_proj and
  k_proj within every head (HF row i -> row 2i, HF row i + d/2 -> row 2i+1) and export undoes it.
- GQA: num_key_value_heads -> n_kv_heads; both sides give query head h the kv head h // group.
- Bias: the spec has none. Llama's attention_bias / mlp_bias and Qwen2's always-present q/k/v
  biases are accepted only when every bias value is exactly zero (then the function is the same);
  a nonzero bias is refused.
- Head: tie_word_embeddings -> tie_embeddings; an untied lm_head.weight is kept.
- rms_norm_eps -> norm_eps, rope_theta (or rope_parameters.rope_theta) -> rope_theta.
- Refused: other architectures, activations other than SiLU, RoPE scaling (llama3, yarn, ...),
  head_dim != hidden_size / num_attention_heads, and a sliding window shorter than the model's
  max_seq_len (max_seq_len is capped at the window instead, so the window never binds).
  max_seq_len is also capped at MAX_SEQ_LEN_CAP unless asked for more (the backends build RoPE
  tables of that length).

Tensors are read with a small safetensors parser (float32, float16, bfloat16, float64), so
bfloat16 checkpoints load without torch; the model is float32 afterwards.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from diffattn.config import ConfigError, ModelConfig, model_config_from
from diffattn.params import ParamsError, check_params, save_tensors

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MAX_SEQ_LEN_CAP = 8192
TOKENIZER_DIR = "hf_tokenizer"  # a run folder's copy of the checkpoint's tokenizer files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "added_tokens.json")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


class HFError(ValueError):
    """A Hugging Face checkpoint that cannot be read or mapped (message is one line)."""


# ---- reading a checkpoint -----------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (OSError, struct.error, ValueError) as e:
        raise HFError(f"{path}: not a readable safetensors file ({e})") from None
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (a, b) = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dt not in _DTYPES:
            raise HFError(f"{path}: tensor {name!r} has dtype {dt}; only F32, F16, BF16, F64 are read")
        if b > len(data):
            raise HFError(f"{path}: truncated (tensor {name!r} ends past the file)")
        buf = data[a:b]
        if dt == "BF16":  # the high half of a float32
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, np.dtype(_DTYPES[dt]).newbyteorder("<"))
        out[name] = arr.reshape(shape).astype(np.float32)
    return out


def read_hf_tensors(hf_dir) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json names."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise HFError(f"{index}: corrupt shard index") from None
        tensors = {}
        for shard in shards:
            if not (hf_dir / shard).is_file():
                raise HFError(f"{hf_dir}: shard {shard} named by the index is missing")
            tensors.update(_read_safetensors(hf_dir / shard))
        return tensors
    if (hf_dir / "model.safetensors").is_file():
        return _read_safetensors(hf_dir / "model.safetensors")
    if any(hf_dir.glob("*.bin")):
        raise HFError(f"{hf_dir}: holds PyTorch .bin weights only; convert them to safetensors first")
    raise HFError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def rope_theta_of(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (rp, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise HFError(f"RoPE scaling {kind!r} is not supported (the spec's RoPE is unscaled)")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_of(hf: dict, max_seq_len: int | None = None) -> tuple[ModelConfig, dict]:
    """ModelConfig of a transformers config.json (a dict), and notes on what was adapted."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise HFError(f"architecture {archs or hf.get('model_type')!r} is not supported; "
                      f"expected one of {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act={hf['hidden_act']!r}: only SiLU (SwiGLU MLP) is supported")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise HFError(f"head_dim={head_dim} with {heads} heads != hidden_size={d}: the spec derives head_dim "
                      "as d_model / n_heads")
    notes = {"architecture": arch}
    limit = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    if window is not None and (ARCHITECTURES[arch] == "mistral" or hf.get("use_sliding_window")):
        if int(window) < limit:
            notes["max_seq_len_capped_at_sliding_window"] = int(window)
            limit = int(window)
    if max_seq_len is not None:
        if max_seq_len > limit:
            raise HFError(f"max_seq_len={max_seq_len} exceeds what the checkpoint computes exactly ({limit})")
        limit = max_seq_len
    elif limit > MAX_SEQ_LEN_CAP:
        notes["max_seq_len_capped"] = MAX_SEQ_LEN_CAP
        limit = MAX_SEQ_LEN_CAP
    try:
        cfg = ModelConfig(vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]),
                          n_heads=heads, n_kv_heads=None if kv == heads else kv, attention="vanilla",
                          ffn_hidden=int(hf["intermediate_size"]), rope_theta=rope_theta_of(hf),
                          norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                          tie_embeddings=bool(hf.get("tie_word_embeddings", False)), max_seq_len=limit,
                          init_std=float(hf.get("initializer_range", 0.02)))
    except ConfigError as e:
        raise HFError(f"config.json does not describe a model of this suite: {e}") from None
    return cfg, notes


def interleave_rows(heads: int, dim: int) -> np.ndarray:
    """Row order taking HF's half-split RoPE layout to the spec's interleaved one, per head:
    new[:, 2i] = old[:, i], new[:, 2i+1] = old[:, i + dim/2]."""
    half = np.arange(dim // 2)
    order = np.stack([half, half + dim // 2], -1).reshape(-1)
    return (np.arange(heads)[:, None] * dim + order).reshape(-1)


HF_NAMES = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
            "self_attn.o_proj": "attn.out_proj", "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3",
            "mlp.down_proj": "mlp.w2", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical parameters of a vanilla cfg from HF tensor names (biases must be zero)."""
    t = dict(tensors)
    for name in [n for n in t if n.endswith(".bias")]:
        if np.any(t[name] != 0):
            raise HFError(f"tensor {name!r} is a nonzero bias; the spec has no biases (Qwen2-style q/k/v bias "
                          "is accepted only when it is all zeros)")
        del t[name]
    for name in [n for n in t if n.endswith("rotary_emb.inv_freq")]:
        del t[name]  # a buffer some exports carry; recomputed from rope_theta
    out = {}

    def take(hf_name, ours):
        if hf_name not in t:
            raise HFError(f"checkpoint lacks tensor {hf_name!r}")
        out[ours] = t.pop(hf_name)

    take("model.embed_tokens.weight", "embed.weight")
    take("model.norm.weight", "norm.weight")
    if not cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    else:
        t.pop("lm_head.weight", None)  # tied: the same values as the embedding
    hd = cfg.head_dim
    for i in range(cfg.n_layers):
        for hf, ours in HF_NAMES.items():
            take(f"model.layers.{i}.{hf}.weight", f"layers.{i}.{ours}.weight")
        for proj, heads in (("q_proj", cfg.q_heads), ("k_proj", cfg.k_heads)):
            name = f"layers.{i}.attn.{proj}.weight"
            if out[name].shape[0] != heads * hd:
                raise HFError(f"{proj} of layer {i} has {out[name].shape[0]} rows, expected {heads * hd}")
            out[name] = out[name][interleave_rows(heads, hd)]
    if t:
        raise HFError(f"checkpoint has tensors this mapping does not know, e.g. {sorted(t)[0]!r} ({len(t)} left)")
    try:
        check_params(cfg, out, what="imported checkpoint")
    except ParamsError as e:
        raise HFError(str(e)) from None
    return {n: out[n] for n in _canonical_order(cfg)}


def _canonical_order(cfg):
    from diffattn.params import param_shapes

    return list(param_shapes(cfg))


def read_hf(hf_dir, max_seq_len: int | None = None) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """(vanilla ModelConfig, canonical params, notes) of a local HF checkpoint folder."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise HFError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except ValueError:
        raise HFError(f"{hf_dir}/config.json: corrupt JSON") from None
    cfg, notes = model_config_of(hf, max_seq_len)
    return cfg, params_from_hf(cfg, read_hf_tensors(hf_dir)), notes


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in src into dst; returns their names."""
    found = [f for f in TOKENIZER_FILES if (Path(src) / f).is_file()]
    if found:
        Path(dst).mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copyfile(Path(src) / f, Path(dst) / f)
    return found


# ---- writing a checkpoint -----------------------------------------------------------------

def llama_config(cfg: ModelConfig) -> dict:
    """config.json of a LlamaForCausalLM computing exactly the vanilla cfg."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "initializer_range": cfg.init_std, "torch_dtype": "float32", "dtype": "float32"}


def hf_from_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF Llama tensor names and row layout of a vanilla model's canonical params."""
    back = {v: k for k, v in HF_NAMES.items()}
    out = {"model.embed_tokens.weight": params["embed.weight"], "model.norm.weight": params["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head.weight"]
    hd = cfg.head_dim
    for i in range(cfg.n_layers):
        for ours, hf in back.items():
            w = params[f"layers.{i}.{ours}.weight"]
            heads = {"attn.q_proj": cfg.q_heads, "attn.k_proj": cfg.k_heads}.get(ours)
            if heads is not None:
                w = w[np.argsort(interleave_rows(heads, hd))]
            out[f"model.layers.{i}.{hf}.weight"] = w
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_hf(cfg: ModelConfig, params: dict[str, np.ndarray], out_dir, tokenizer_dir=None) -> Path:
    """Write a Hugging Face checkpoint folder: vanilla as LlamaForCausalLM, DIFF (V1, V2) as a
    `diffattn` model with its modeling file (load with trust_remote_code=True)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise HFError(f"{out}: exists and is not empty; choose another folder")
    check_params(cfg, params)
    if cfg.attention == "vanilla":
        config, tensors = llama_config(cfg), hf_from_params(cfg, params)
    else:
        config = {"architectures": ["DiffAttnForCausalLM"], "model_type": "diffattn",
                  "auto_map": {"AutoConfig": "modeling_diffattn.DiffAttnConfig",
                               "AutoModelForCausalLM": "modeling_diffattn.DiffAttnForCausalLM"},
                  "model_config": {k: v for k, v in cfg.__dict__.items()},
                  "vocab_size": cfg.vocab_size, "tie_word_embeddings": False}
        tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).with_name("modeling_diffattn.py"), out / "modeling_diffattn.py")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    if tokenizer_dir is not None:
        copy_tokenizer(Path(tokenizer_dir), out)
    return out


# ---- run folders ----------------------------------------------------------------------------

def write_run(run_dir, cfg: ModelConfig, params: dict[str, np.ndarray], origin: dict) -> Path:
    """A run folder holding one step-0 checkpoint of (cfg, params) with a fresh optimizer state;
    `origin` (what it came from) goes into the manifest. `train --resume-from RUN` starts from it."""
    from diffattn import harness, optim

    run = Path(run_dir)
    if run.exists() and any(run.iterdir()):
        raise HFError(f"--out {run}: exists and is not empty; choose another folder")
    manifest = {"model_config": harness.config_dict(cfg), "origin": origin}
    return harness.save_checkpoint(run, 0, params, optim.init_state(params), manifest)


def read_run(run_dir) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    """(cfg, params, manifest) of a run folder's latest checkpoint (or a checkpoint folder)."""
    from diffattn import harness

    params, _, manifest, _ = harness.load_checkpoint(run_dir)
    return model_config_from(manifest["model_config"]), params, manifest


def tokenizer_of(run_dir) -> Path | None:
    """The HF tokenizer folder kept with a run (the import's, carried through convert)."""
    from diffattn import harness

    root = harness.find_checkpoint(run_dir).parent.parent
    return root / TOKENIZER_DIR if (root / TOKENIZER_DIR).is_dir() else None
