"""The Backend protocol, the registry, and the numpy reference backend.

The harness, paired runs, conformance and benchmarks talk only to this interface; a backend
never reimplements the loop. Everything crossing it is numpy.

    backend = diffattn.backend.load("mlx" | "cuda" | "numpy", device=..., dtype=..., kernels=...)
    model = backend.build(model_config, params, optim=AdamWConfig())

Batches are int arrays of shape (B, L+1): inputs batch[:, :-1], targets batch[:, 1:].
`train_step` also takes (n_micro, B, L+1) for gradient accumulation (gradients averaged over
micro-batches, one optimizer update).
"""
from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np

from diffattn import optim, spec
from diffattn.config import AdamWConfig, ModelConfig
from diffattn.params import check_params

KERNELS = ("auto", "fused", "composed", "naive")
DTYPES = ("float64", "float32", "bfloat16", "float16")

# name -> (module, extra to install, framework module to probe)
REGISTRY = {
    "numpy": ("diffattn.backend", None, "numpy"),
    "mlx": ("backends.mlx", "mlx", "mlx.core"),
    "cuda": ("backends.cuda", "cuda", "torch"),
}


class BackendError(RuntimeError):
    """A backend that cannot be loaded or cannot do what was asked (message is one line)."""


@runtime_checkable
class Model(Protocol):
    cfg: ModelConfig

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L) int tokens -> (B, L, vocab) float logits."""

    def loss_and_grads(self, batch: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean next-token cross-entropy (nats) and its gradient for every parameter."""

    def token_losses(self, batch: np.ndarray) -> np.ndarray:
        """(B, L) per-token cross-entropy in nats (for eval, bpb and loss by position)."""

    def train_step(self, batch: np.ndarray, lr: float):
        """One AdamW update (optim.adamw_step semantics). Returns the pre-update loss as a
        handle whose float() is the value; it may still be computing (MLX, CUDA)."""

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(params, optimizer state) as numpy (float32; float64 for the numpy backend in float64),
        the optimizer state laid out as optim.init_state."""

    def load_state(self, params: dict[str, np.ndarray], opt_state: dict) -> None: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str
    dtype: str
    kernels: str

    def build(self, cfg: ModelConfig, params: dict[str, np.ndarray], optim: AdamWConfig = AdamWConfig()) -> Model: ...

    def attention_vjp(self, cfg: ModelConfig, layer: int, params: dict[str, np.ndarray],
                      x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One attention layer (params named as in params.attention_shapes): output, grad of x,
        grads of its parameters, for upstream gradient grad_out. Positions are 0..L-1."""

    def describe(self) -> dict:
        """Framework versions and device name, for run manifests."""


def load(name: str, device: str | None = None, dtype: str | None = None, kernels: str = "auto",
         options=None, **option_fields) -> Backend:
    """Load a backend by name; a missing framework is a one-line BackendError naming the extra.
    dtype None means the backend's default (numpy: float64, mlx and cuda: float32). options is the
    backend's own typed options (its module's `Options` dataclass, e.g. backends/cuda's CudaOptions:
    compile, CUDA graphs, kernel options), or its fields given by name (load("cuda", compile=True));
    a backend without options refuses any. They change speed, not the math."""
    if name not in REGISTRY:
        raise BackendError(f"unknown backend {name!r}, expected one of {tuple(REGISTRY)}")
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}, expected one of {DTYPES}")
    if kernels not in KERNELS:
        raise BackendError(f"unknown kernels {kernels!r}, expected one of {KERNELS}")
    module, extra, framework = REGISTRY[name]
    try:
        importlib.import_module(framework)
    except ImportError:
        raise BackendError(f"backend {name!r} needs {framework.split('.')[0]}, which is not installed: "
                           f"pip install 'diffattn[{extra}]'") from None
    try:
        backend = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != "backends":
            raise
        raise BackendError(f"backend {name!r}: the package `backends` is not importable: install the project "
                           f"(pip install -e .) or run from the repository root (PYTHONPATH=.)") from None
    given = {k: v for k, v in option_fields.items() if v is not None}
    if options is None and not given:
        return backend.create(device=device, dtype=dtype, kernels=kernels)
    if not hasattr(backend, "Options"):
        what = " / ".join(sorted(given)) if given else type(options).__name__
        raise BackendError(f"backend {name!r} has no {what} option (it takes no options)")
    if options is not None and not isinstance(options, backend.Options):
        raise BackendError(f"backend {name!r} options must be its {backend.Options.__name__}, got {type(options).__name__}")
    return backend.create(device=device, dtype=dtype, kernels=kernels, options=options, **given)


# ---- the numpy reference backend ------------------------------------------------------------

class NumpyModel:
    """The spec as a trainable model, computing in its dtype (float64 by default)."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray], optim_cfg: AdamWConfig, dtype: str):
        check_params(cfg, params)
        self.cfg, self.optim_cfg = cfg, optim_cfg
        self.dtype = np.float64 if dtype == "float64" else np.float32
        self.params = {k: np.asarray(v, self.dtype) for k, v in params.items()}
        self.opt_state = optim.init_state(self.params)

    def logits(self, tokens):
        return spec.model_logits(self.cfg, self.params, tokens, self.dtype)

    def loss_and_grads(self, batch):
        return spec.model_loss_and_grads(self.cfg, self.params, batch, self.dtype)

    def token_losses(self, batch):
        return spec.token_losses(self.cfg, self.params, batch, self.dtype)

    def train_step(self, batch, lr):
        batch = np.asarray(batch)
        micro = batch if batch.ndim == 3 else batch[None]
        loss, grads = 0.0, None
        for mb in micro:
            l, g = self.loss_and_grads(mb)
            loss += l / len(micro)
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        grads = {k: v / len(micro) for k, v in grads.items()}
        self.params, self.opt_state = optim.adamw_step(self.params, grads, self.opt_state, lr, self.optim_cfg)
        self.params = {k: v.astype(self.dtype) for k, v in self.params.items()}
        return loss

    def state(self):
        return {k: v.copy() for k, v in self.params.items()}, optim.copy_state(self.opt_state)

    def load_state(self, params, opt_state):
        check_params(self.cfg, params)
        self.params = {k: np.asarray(v, self.dtype) for k, v in params.items()}
        self.opt_state = optim.copy_state(opt_state)


class NumpyBackend:
    name = "numpy"
    device = "cpu"

    def __init__(self, dtype: str = "float64", kernels: str = "auto"):
        if dtype not in ("float64", "float32"):
            raise BackendError(f"backend 'numpy' computes in float64 (parameters float64 or float32), not {dtype}")
        if kernels not in ("auto", "naive"):
            raise BackendError(f"backend 'numpy' has only the naive (materialized) attention, not kernels={kernels!r}")
        self.dtype, self.kernels = dtype, "naive"

    def build(self, cfg, params, optim: AdamWConfig = AdamWConfig()):
        return NumpyModel(cfg, params, optim, self.dtype)

    def attention_vjp(self, cfg, layer, params, x, grad_out):
        return spec.attention_vjp(cfg, layer, params, x, grad_out, dtype=np.dtype(self.dtype))

    def describe(self):
        return {"backend": "numpy", "numpy": np.__version__, "device": "cpu", "dtype": self.dtype}


def create(device=None, dtype=None, kernels="auto"):
    if device not in (None, "cpu"):
        raise BackendError(f"backend 'numpy' runs on the CPU only, not device={device!r}")
    return NumpyBackend(dtype=dtype or "float64", kernels=kernels)
