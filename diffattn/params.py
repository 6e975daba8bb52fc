"""Canonical parameter names and shapes, seeded paired init, safetensors I/O.

Names (Linear weights are (out, in), as in PyTorch and MLX; attention names follow
Microsoft's reference modules so its fixtures map without a table):

    embed.weight                               (vocab, d)
    layers.{i}.attn_norm.weight                (d,)
    layers.{i}.attn.q_proj.weight              (q_heads*head_dim, d)
    layers.{i}.attn.k_proj.weight              (k_heads*head_dim, d)
    layers.{i}.attn.v_proj.weight              (kv_heads*v_head_dim, d)
    layers.{i}.attn.out_proj.weight            (d, n_heads*v_head_dim)
    layers.{i}.attn.lambda_q1 / k1 / q2 / k2   (head_dim,)          diff only
    layers.{i}.attn.subln.weight               (v_head_dim,)        diff with diff_subln only
    layers.{i}.attn.lambda_proj.weight         (n_heads, d)         diff_v2 only
    layers.{i}.mlp_norm.weight                 (d,)
    layers.{i}.mlp.w1.weight / w3.weight       (ffn, d)   gate / up (SwiGLU)
    layers.{i}.mlp.w2.weight                   (d, ffn)   down
    norm.weight                                (d,)
    lm_head.weight                             (vocab, d)           only if not tie_embeddings

Paired init: every tensor is drawn from its own stream seeded by (seed, name), so a DIFF
model and its vanilla twin get byte-identical values for every tensor they share (same
name and shape) whatever else each model holds. Variant-only tensors (lambdas, subln,
lambda_proj) are drawn from a separate stream tag so they can never alias a shared one.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import zlib
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config imports this module (ModelConfig.num_params), not the reverse
    from diffattn.config import ModelConfig

VARIANT_ONLY = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight", "lambda_proj.weight")


class ParamsError(ValueError):
    """Parameters or a parameter file that do not fit the model (message is one line)."""


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one attention layer's tensors, by name relative to `layers.{i}.attn.`."""
    d, hd = cfg.d_model, cfg.head_dim
    shapes = {
        "q_proj.weight": (cfg.q_heads * hd, d),
        "k_proj.weight": (cfg.k_heads * hd, d),
        "v_proj.weight": (cfg.kv_heads * cfg.v_head_dim, d),
        "out_proj.weight": (d, cfg.n_heads * cfg.v_head_dim),
    }
    if cfg.attention == "diff":
        shapes.update({n: (hd,) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")})
        if cfg.diff_subln:
            shapes["subln.weight"] = (cfg.v_head_dim,)
    elif cfg.attention == "diff_v2":
        shapes["lambda_proj.weight"] = (cfg.n_heads, d)
    return shapes


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.ffn_dim
    shapes = {"embed.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes.update({p + "attn." + n: s for n, s in attention_shapes(cfg).items()})
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.w1.weight"] = (f, d)
        shapes[p + "mlp.w3.weight"] = (f, d)
        shapes[p + "mlp.w2.weight"] = (d, f)
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _stream(seed: int, name: str) -> np.random.Generator:
    tag = 1 if name.endswith(VARIANT_ONLY) else 0
    return np.random.default_rng([seed, tag, zlib.crc32(name.encode())])


def init_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One tensor's initial value (float32). Norm weights 1, lambdas N(0, 0.1) as in the
    reference, matrices N(0, init_std) with residual outputs scaled by 1/sqrt(2*n_layers)."""
    if name.endswith(("norm.weight", "subln.weight")):
        return np.ones(shape, np.float32)
    rng = _stream(seed, name)
    if name.rsplit(".", 1)[-1].startswith("lambda_"):
        std = 0.1
    elif name.endswith(("out_proj.weight", "mlp.w2.weight")):
        std = cfg.init_std / np.sqrt(2 * cfg.n_layers)
    else:
        std = cfg.init_std
    return (rng.standard_normal(shape) * std).astype(np.float32)


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    return {n: init_tensor(cfg, n, s, seed) for n, s in param_shapes(cfg).items()}


def shared_names(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Tensors two models have in common: same name and same shape."""
    return sorted(n for n in a if n in b and a[n].shape == b[n].shape)


def check_params(cfg: ModelConfig, params: dict[str, np.ndarray], what: str = "params") -> None:
    """Raise ParamsError naming the first tensor that is missing, extra, misshapen or not float."""
    shapes = param_shapes(cfg)
    for n, s in shapes.items():
        if n not in params:
            raise ParamsError(f"{what}: missing tensor {n!r} {s}")
        a = params[n]
        if tuple(a.shape) != s:
            raise ParamsError(f"{what}: tensor {n!r} has shape {tuple(a.shape)}, expected {s}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ParamsError(f"{what}: tensor {n!r} has dtype {a.dtype}, expected a float dtype")
        if not np.all(np.isfinite(a)):
            raise ParamsError(f"{what}: tensor {n!r} holds NaN or Inf")
    extra = sorted(set(params) - set(shapes))
    if extra:
        raise ParamsError(f"{what}: unexpected tensor {extra[0]!r} ({len(extra)} extra)")


# ---- files -------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write) -> None:
    """Write a file through a temporary sibling and rename it into place, so a crash at any
    moment leaves either the old file or the new one, never a torn one. The file is fsynced
    before the rename and its folder after it (the rename itself is then durable); it gets
    the mode any new file gets (0666 less the umask), not a temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors does) leaves 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    def write(tmp):
        save_file(arrays, tmp, metadata=meta)
        _sort_metadata(tmp)

    atomic_write(path, write)


def _sort_metadata(path) -> None:
    """safetensors writes the metadata map in a per-process hash order, so the same tensors and
    metadata made other bytes in another process (a resumed run's checkpoint differed from the
    uninterrupted run's). Rewrite the header with the metadata keys sorted: same keys and
    values in the same compact JSON, so the header keeps its length and the tensor offsets
    (relative to the end of the header) are untouched."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (n - len(text))  # the writer pads its header with spaces to 8 bytes
        if len(text) != n:
            raise ParamsError(f"{path}: safetensors header re-encoded to {len(text)} bytes, not its {n}")
        f.seek(8)
        f.write(text)


def load_tensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file; a missing, truncated or corrupt file is a one-line ParamsError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise ParamsError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def save_params(path, cfg: ModelConfig, params: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    check_params(cfg, params)
    save_tensors(path, params, {"model_config": cfg.__dict__, **(metadata or {})})


def load_params(path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    params, _ = load_tensors(path)
    check_params(cfg, params, what=str(path))
    return params


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (checkpoint manifests, the corpus manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
