"""The Backend protocol, the registry, and the numpy reference backend.

The harness, paired runs, conformance and benchmarks talk only to this interface; a backend
never reimplements the loop. Everything crossing it is numpy.

    backend = diffattn.backend.load("mlx" | "cuda" (alias "torch") | "numpy", device=..., dtype=..., kernels=...)
    model = backend.build(model_config, params, optim=AdamWConfig(), muon=None)   # or muon=MuonConfig()

Batches are int arrays of shape (B, L+1): inputs batch[:, :-1], targets batch[:, 1:].
`train_step` also takes (n_micro, B, L+1) for gradient accumulation (gradients averaged over
micro-batches, one optimizer update). The update is optim.update's: AdamW (optim) for every
tensor, or with muon given Muon for the hidden matrices and AdamW for the rest; a model refuses
an optimizer state of the other optimizer (load_state).

Decoding: `prefill(tokens (B, T), max_len)` (re)allocates the model's key/value cache for B rows
of max_len positions (diffattn/decode.py says what each variant caches), fills positions
0..T-1 and returns their logits; `decode_step(tokens (B,))` appends one position to every row
and returns its logits (B, V). The cache is the backend's own, static and preallocated; a
train_step or load_state after a prefill invalidates it (prefill again). diffattn/generate.py
samples over this pair.
"""
from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np

from diffattn import decode, optim, spec
from diffattn.config import AdamWConfig, ModelConfig, MuonConfig
from diffattn.params import check_params

KERNELS = ("auto", "fused", "composed", "naive")
DTYPES = ("float64", "float32", "bfloat16", "float16")

# name -> (module, extra to install, framework module to probe)
REGISTRY = {
    "numpy": ("diffattn.backend", None, "numpy"),
    "mlx": ("backends.mlx", "mlx", "mlx.core"),
    "cuda": ("backends.cuda", "cuda", "torch"),
}
# other names a backend answers to: the PyTorch backend runs on a CPU as well as on CUDA
ALIASES = {"torch": "cuda"}
FRAMEWORK_NAME = {"numpy": "numpy", "mlx": "mlx", "cuda": "torch"}


def describe_short(backend) -> str:
    """What runs, on what, in what precision, e.g. "torch (cpu, float32)" for the PyTorch backend
    on a CPU: the framework's name, never the registry's "cuda" for a CPU run."""
    return f"{FRAMEWORK_NAME.get(backend.name, backend.name)} ({backend.device}, {backend.dtype})"


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
        """One optimizer update (optim.update semantics). Returns the pre-update loss as a
        handle whose float() is the value; it may still be computing (MLX, CUDA)."""

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(params, optimizer state) as numpy (float32; float64 for the numpy backend in float64),
        the optimizer state laid out as optim.init_state."""

    def load_state(self, params: dict[str, np.ndarray], opt_state: dict) -> None: ...

    def prefill(self, tokens: np.ndarray, max_len: int | None = None) -> np.ndarray:
        """(B, T) prompt -> (B, T, vocab) logits; allocates a cache of max_len positions
        (default cfg.max_seq_len) and fills its first T."""

    def decode_step(self, tokens: np.ndarray) -> np.ndarray:
        """(B,) next tokens, one per row -> (B, vocab) logits at the next cached position."""
    # Every backend's model also has set_lambda_mix(w): the DIFF variants' negative-map weight
    # (spec.py's lambda_mix) for what follows; the harness's lambda warmup calls it.


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str
    dtype: str
    kernels: str

    def build(self, cfg: ModelConfig, params: dict[str, np.ndarray], optim: AdamWConfig = AdamWConfig(),
              muon: MuonConfig | None = None) -> Model: ...

    def attention_vjp(self, cfg: ModelConfig, layer: int, params: dict[str, np.ndarray],
                      x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One attention layer (params named as in params.attention_shapes): output, grad of x,
        grads of its parameters, for upstream gradient grad_out. Positions are 0..L-1."""

    def describe(self) -> dict:
        """Framework versions and device name, for run manifests."""


def load(name: str, device: str | None = None, dtype: str | None = None, kernels: str = "auto",
         options=None, parallel: str | None = None, **option_fields) -> Backend:
    """Load a backend by name; a missing framework is a one-line BackendError naming the extra.
    dtype None means the backend's default (numpy: float64, mlx and cuda: float32). options is the
    backend's own typed options (its module's `Options` dataclass, e.g. backends/cuda's CudaOptions:
    compile, CUDA graphs, kernel options), or its fields given by name (load("cuda", compile=True));
    a backend without options refuses any. They change speed, not the math.

    parallel: training over several processes on the framework's own engine ("ddp": data
    parallel, mlx and cuda; "fsdp": sharded, cuda), each backend's parallel.py. None: "ddp" when
    a launcher (torchrun, mlx.launch) started several processes, else "none". A parallel backend
    has rank, world_size and is_writer (rank 0: the one process that writes run folders); its
    models take the global batch in train_step and keep their rank's rows. It is load's own
    argument, not a backend option: mlx and cuda both take it."""
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise BackendError(f"unknown backend {name!r}, expected one of {tuple(REGISTRY) + tuple(ALIASES)}")
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}, expected one of {DTYPES}")
    if kernels not in KERNELS:
        raise BackendError(f"unknown kernels {kernels!r}, expected one of {KERNELS}")
    if parallel not in (None, "none"):
        if name == "numpy":
            raise BackendError(f"backend 'numpy' runs in one process: no parallel={parallel!r} (mlx and cuda have ddp)")
    topology = {} if name == "numpy" else {"parallel": parallel}
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
        return backend.create(device=device, dtype=dtype, kernels=kernels, **topology)
    if not hasattr(backend, "Options"):
        what = " / ".join(sorted(given)) if given else type(options).__name__
        raise BackendError(f"backend {name!r} has no {what} option (it takes no options)")
    if options is not None and not isinstance(options, backend.Options):
        raise BackendError(f"backend {name!r} options must be its {backend.Options.__name__}, got {type(options).__name__}")
    return backend.create(device=device, dtype=dtype, kernels=kernels, options=options, **topology, **given)


def rank_rows(batch, rank: int, world: int):
    """Rank `rank`'s contiguous slice of the rows of a global (B, L+1) or (n_micro, B, L+1)
    batch (numpy or torch): the data-parallel split, so that `world` processes together see
    exactly the batch one process would."""
    rows = batch.shape[-2]
    if rows % world:
        raise BackendError(f"a batch of {rows} rows does not split over {world} processes: "
                           f"give a batch size that is a multiple of {world}")
    n = rows // world
    return batch[..., rank * n:(rank + 1) * n, :]


def check_optimizer(opt_state: dict, optimizer: str) -> None:
    """An optimizer state is resumed only by the optimizer that wrote it (AdamW's v and Muon's
    zero v would silently mean different things)."""
    theirs = opt_state.get("optimizer", "adamw")
    if theirs != optimizer:
        raise BackendError(f"optimizer state of {theirs!r} cannot resume a {optimizer!r} model "
                           f"(train with --optimizer {theirs}, or start afresh)")


# ---- the numpy reference backend ------------------------------------------------------------

class NumpyModel:
    """The spec as a trainable model, computing in its dtype (float64 by default)."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray], optim_cfg: AdamWConfig, dtype: str,
                 muon: MuonConfig | None = None):
        check_params(cfg, params)
        self.cfg, self.optim_cfg, self.muon = cfg, optim_cfg, muon
        self.optimizer = "adamw" if muon is None else "muon"
        self.dtype = np.float64 if dtype == "float64" else np.float32
        self.params = {k: np.asarray(v, self.dtype) for k, v in params.items()}
        self.opt_state = optim.init_state(self.params, self.optimizer)
        self.cache = None
        self.lambda_mix = 1.0

    def set_lambda_mix(self, mix: float) -> None:
        """The negative map's weight of the DIFF variants (spec.py's lambda_mix), for what follows."""
        self.lambda_mix = float(mix)

    def logits(self, tokens):
        return spec.model_logits(self.cfg, self.params, tokens, self.dtype, self.lambda_mix)

    def loss_and_grads(self, batch):
        return spec.model_loss_and_grads(self.cfg, self.params, batch, self.dtype, self.lambda_mix)

    def token_losses(self, batch):
        return spec.token_losses(self.cfg, self.params, batch, self.dtype, self.lambda_mix)

    def train_step(self, batch, lr):
        batch = np.asarray(batch)
        micro = batch if batch.ndim == 3 else batch[None]
        loss, grads = 0.0, None
        for mb in micro:
            l, g = self.loss_and_grads(mb)
            loss += l / len(micro)
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        grads = {k: v / len(micro) for k, v in grads.items()}
        self.params, self.opt_state = optim.update(self.params, grads, self.opt_state, lr, self.optim_cfg, self.muon)
        self.params = {k: v.astype(self.dtype) for k, v in self.params.items()}
        self.cache = None
        return loss

    def state(self):
        return {k: v.copy() for k, v in self.params.items()}, optim.copy_state(self.opt_state)

    def load_state(self, params, opt_state):
        check_params(self.cfg, params)
        check_optimizer(opt_state, self.optimizer)
        self.params = {k: np.asarray(v, self.dtype) for k, v in params.items()}
        self.opt_state = optim.copy_state(opt_state)
        self.cache = None

    def prefill(self, tokens, max_len=None):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise BackendError(f"prefill tokens have shape {tokens.shape}, expected (B, T)")
        try:
            self.cache = decode.new_cache(self.cfg, tokens.shape[0], max_len, self.dtype)
            return decode.forward(self.cfg, self.params, tokens, self.cache, self.dtype)
        except ValueError as e:
            raise BackendError(f"prefill: {e}") from None

    def decode_step(self, tokens):
        if self.cache is None:
            raise BackendError("decode_step before prefill (or after a train_step / load_state): prefill first")
        try:
            return decode.forward(self.cfg, self.params, np.asarray(tokens).reshape(-1, 1), self.cache,
                                  self.dtype)[:, 0]
        except ValueError as e:
            raise BackendError(f"decode_step: {e}") from None


class NumpyBackend:
    name = "numpy"
    device = "cpu"

    def __init__(self, dtype: str = "float64", kernels: str = "auto"):
        if dtype not in ("float64", "float32"):
            raise BackendError(f"backend 'numpy' computes in float64 (parameters float64 or float32), not {dtype}")
        if kernels not in ("auto", "naive"):
            raise BackendError(f"backend 'numpy' has only the naive (materialized) attention, not kernels={kernels!r}")
        self.dtype, self.kernels = dtype, "naive"

    def build(self, cfg, params, optim: AdamWConfig = AdamWConfig(), muon: MuonConfig | None = None):
        return NumpyModel(cfg, params, optim, self.dtype, muon)

    def attention_vjp(self, cfg, layer, params, x, grad_out):
        return spec.attention_vjp(cfg, layer, params, x, grad_out, dtype=np.dtype(self.dtype))

    def describe(self):
        return {"backend": "numpy", "numpy": np.__version__, "device": "cpu", "dtype": self.dtype}


def create(device=None, dtype=None, kernels="auto"):
    if device not in (None, "cpu"):
        raise BackendError(f"backend 'numpy' runs on the CPU only, not device={device!r}")
    return NumpyBackend(dtype=dtype or "float64", kernels=kernels)
