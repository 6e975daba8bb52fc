"""The training side of the CUDA backend: the Model protocol over a Transformer, AdamW or Muon, the step.

AdamW is torch.optim.AdamW in two parameter groups (weight decay on matrices only, as
diffattn.optim.decays) after torch.nn.utils.clip_grad_norm_: together exactly diffattn.optim's
adamw_step (checked step by step against the numpy backend in tests/test_cuda_backend.py).
With a MuonConfig, the hidden matrices (optim.is_muon) go to `Muon` below, optim.muon_step's update
written out in torch (torch.optim.Muon runs Newton-Schulz in bf16 only), and the rest to AdamW;
matrices of one shape are orthogonalised together as one batch of matmuls.
bfloat16 runs under autocast with float32 master weights and optimizer state; float32 and
float64 run plainly. Gradient accumulation: a (n_micro, B, L+1) batch backpropagates each
micro-batch's loss / n_micro, then takes one update.

graphs=True (CUDA only) records the whole step once as a CUDA graph and replays it (StepGraph):
the host then issues a step in ~1 ms instead of 26-38 ms of Python (stage1 on an H200). The step
was already GPU-bound there, so it gains little time itself (docs/kernels.md, v7); the host is free.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from diffattn import optim as optim_spec
from diffattn.backend import BackendError, check_optimizer
from diffattn.config import AdamWConfig, ModelConfig, MuonConfig
from diffattn.params import check_params
from backends.cuda.model import Attention, build_transformer, load_numpy

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}
# Inductor compiles Triton kernels, ours among them, with debug = assert_indirect_indexing, and
# Triton's debug mode guards every int32 add and multiply with an overflow assert (docs/kernels.md, v6)
COMPILE_OPTIONS = {"assert_indirect_indexing": False}


def make_adamw(module: torch.nn.Module, cfg: AdamWConfig, fused: bool, lr=0.0,
               skip_muon: bool = False) -> torch.optim.AdamW:
    """lr: a float, set per step; or a CUDA tensor that a captured step reads at every replay.
    skip_muon: leave out the tensors Muon updates (optim.is_muon)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not (skip_muon and optim_spec.is_muon(name, p)):
            (decay if optim_spec.decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {"foreach": True}
    if isinstance(lr, torch.Tensor):
        kw["capturable"] = True  # the step count stays on the GPU, and the update never syncs
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)


def newton_schulz(u: torch.Tensor, cfg: MuonConfig) -> torch.Tensor:
    """optim.newton_schulz over the last two axes, in u's dtype (bf16 with ns_dtype "bfloat16")."""
    a, b, c = cfg.ns_coefficients
    x = u.bfloat16() if cfg.ns_dtype == "bfloat16" else u
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + cfg.ns_eps)
    for _ in range(cfg.ns_steps):
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """optim.muon_step's update of the hidden matrices: momentum buffer, Nesterov, Newton-Schulz,
    decoupled decay, 0.2 sqrt(max(rows, cols)) scale. Gradients come clipped. lr as make_adamw's."""

    def __init__(self, params, cfg: MuonConfig, lr=0.0):
        super().__init__(params, {"lr": lr})
        self.cfg = cfg

    @torch.no_grad()
    def step(self):
        cfg, mu = self.cfg, self.cfg.momentum
        for group in self.param_groups:
            lr = group["lr"]
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                for p in ps:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
                grads = [p.grad for p in ps]
                torch._foreach_lerp_(bufs, grads, 1.0 - mu)  # m <- mu m + (1 - mu) g
                u = torch.stack([g.lerp(m, mu) for g, m in zip(grads, bufs)] if cfg.nesterov else bufs)
                o = newton_schulz(u, cfg).to(ps[0].dtype).unbind(0)
                torch._foreach_mul_(ps, 1.0 - lr * cfg.weight_decay)
                torch._foreach_add_(ps, torch._foreach_mul(o, -lr * optim_spec.muon_scale(shape)))


class StepGraph:
    """A training step recorded once as a CUDA graph and replayed.

    The first WARMUP steps of a batch shape run eagerly on a side stream, as capture requires:
    torch.compile compiles there, and cuBLAS, cuDNN and the optimizer's state are set up. The next
    step is recorded, then replayed; it and every later step of that shape replay the graph. A
    replay reads the batch from a buffer the graph owns (filled before each replay) and the
    learning rate from the optimizer's lr tensor, and writes the loss to a tensor the graph owns;
    callers get a copy. Anything that replaces tensors the graph reads (new optimizer state, a new
    batch shape) must reset() it.
    """
    WARMUP = 3
    # steps a benchmark runs before its clock: the eager ones, the recording (which replays) and
    # one more replay, so that timed steps are replays alone
    STEPS_TO_STEADY = WARMUP + 2

    def __init__(self, step):
        self.step = step  # batch on the GPU -> mean loss; forward, backward, clip, update
        self.side = torch.cuda.Stream()
        self.reset()

    def reset(self):
        self.shape, self.eager_steps, self.graph, self.batch, self.loss = None, 0, None, None, None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape != self.shape:
            self.reset()
            self.shape = batch.shape
        if self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self.step(batch)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        if self.graph is None:
            self.batch, self.graph = batch.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing
                self.loss = self.step(self.batch)
        else:
            self.batch.copy_(batch)
        self.graph.replay()
        return self.loss.clone()


class CudaModel:
    """A Transformer with its optimizer, speaking numpy at the Backend protocol's edge."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray], optim_cfg: AdamWConfig,
                 device: torch.device, dtype: str, kernels: str, compile: bool = False, graphs: bool = False,
                 muon: MuonConfig | None = None, kernel_options=None):
        check_params(cfg, params)
        self.cfg, self.optim_cfg, self.device, self.dtype = cfg, optim_cfg, device, dtype
        self.optimizer_name = "adamw" if muon is None else "muon"
        self.param_dtype = TORCH_DTYPES[dtype]
        self.module = build_transformer(cfg, kernels, kernel_options).to(device=device, dtype=self.param_dtype)
        load_numpy(self.module, params)
        self.names = [n for n, _ in self.module.named_parameters()]
        # the module the training step runs: self.module itself, or its DDP wrapper, sharded in
        # place by FSDP (backends/cuda/parallel.py); before the optimizer, which holds its parameters
        self.step_module = self._parallelize()
        self.lr = torch.zeros((), dtype=torch.float32, device=device) if graphs else 0.0
        self.optimizer = make_adamw(self.module, optim_cfg, fused=device.type == "cuda", lr=self.lr,
                                    skip_muon=muon is not None)
        self.muon = None if muon is None else Muon(
            [p for n, p in self.module.named_parameters() if optim_spec.is_muon(n, p)], muon, lr=self.lr)
        self.step_graph = StepGraph(self._step) if graphs else None
        self.kernels, self.compile, self.graphs = kernels, compile, graphs
        self.decoder = None  # built at prefill from the current weights (decode.Decoder)
        if compile:  # each block (forward and its backward); all blocks share one compiled graph
            for block in self.module.layers:
                block.compile(options=COMPILE_OPTIONS)

    # ---- helpers ---------------------------------------------------------------------------
    def _parallelize(self) -> torch.nn.Module:
        return self.module

    def _micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward; parallel models reduce
        gradients at the last one only."""
        return contextlib.nullcontext()

    def autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tokens(self, a, ndims: tuple[int, ...], what: str) -> torch.Tensor:
        """numpy tokens are checked on the host; a torch tensor (benchmarks) is taken as it is,
        without a value check that would synchronize with the GPU every step."""
        is_tensor = isinstance(a, torch.Tensor)
        if not is_tensor:
            a = np.asarray(a)
        if is_tensor and a.is_floating_point() or not is_tensor and not np.issubdtype(a.dtype, np.integer):
            raise BackendError(f"{what} must hold integer tokens, got dtype {a.dtype}")
        if a.ndim not in ndims or a.shape[-1] < (2 if what == "batch" else 1) or min(a.shape) == 0:
            raise BackendError(f"{what} has shape {tuple(a.shape)}, expected {' or '.join(f'{n}-d' for n in ndims)} "
                               f"{'(B, L+1) or (n_micro, B, L+1) with L >= 1' if what == 'batch' else '(B, L)'}")
        if is_tensor:
            return a.to(self.device, torch.long)
        if a.min() < 0 or a.max() >= self.cfg.vocab_size:
            raise BackendError(f"{what} holds tokens outside [0, {self.cfg.vocab_size})")
        return torch.from_numpy(a.astype(np.int64)).to(self.device)

    def _loss(self, batch: torch.Tensor, reduction: str = "mean", module=None) -> torch.Tensor:
        with self.autocast():
            return (module or self.module)(batch[:, :-1], batch[:, 1:], reduction=reduction)

    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        out = t.detach().to("cpu", torch.float64 if self.dtype == "float64" else torch.float32)
        return out.numpy().copy()

    @torch.no_grad()
    def set_lambda_mix(self, mix: float) -> None:
        """The negative map's weight of the DIFF variants (spec.py's lambda_mix), in place."""
        for m in self.module.modules():
            if isinstance(m, Attention):
                m.lambda_mix.fill_(float(mix))

    # ---- the Model protocol --------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, tokens) -> np.ndarray:
        t = self._tokens(tokens, (2,), "tokens")
        with self.autocast():
            return self._numpy(self.module(t))

    def loss_and_grads(self, batch) -> tuple[float, dict[str, np.ndarray]]:
        b = self._tokens(batch, (2,), "batch")
        params = list(self.module.parameters())
        loss = self._loss(b)
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), {n: self._numpy(g) for n, g in zip(self.names, grads)}

    @torch.no_grad()
    def token_losses(self, batch) -> np.ndarray:
        b = self._tokens(batch, (2,), "batch")
        return self._numpy(self._loss(b, reduction="none"))

    def train_step(self, batch, lr: float) -> torch.Tensor:
        b = self._tokens(batch, (2, 3), "batch")
        self.decoder = None  # its packed weights would go stale
        if self.step_graph is None:
            for group in self._groups():
                group["lr"] = float(lr)
            return self._step(b)
        self.lr.fill_(lr)  # outside the graph: a recorded fill would replay the first step's lr
        return self.step_graph(b)

    def _groups(self):
        return self.optimizer.param_groups + (self.muon.param_groups if self.muon is not None else [])

    def _step(self, b: torch.Tensor) -> torch.Tensor:
        """One update at the optimizer's lr: the mean loss of b's micro-batches, backward, clip,
        AdamW (and Muon)."""
        micro = b if b.ndim == 3 else b[None]
        self.module.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device, dtype=torch.float64 if self.dtype == "float64" else torch.float32)
        for i, mb in enumerate(micro):
            with self._micro_batch(last=i == len(micro) - 1):
                loss = self._loss(mb, module=self.step_module)
                (loss / len(micro)).backward()
            total += loss.detach()
        if self.optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optim_cfg.grad_clip, foreach=True)
        self.optimizer.step()
        if self.muon is not None:
            self.muon.step()
        return total / len(micro)

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        params = {n: self._numpy(p) for n, p in self.module.named_parameters()}
        opt = optim_spec.init_state(params, self.optimizer_name)
        for n, p in self.module.named_parameters():
            s = self.optimizer.state.get(p)
            if s:
                opt["step"] = int(s["step"])
                opt["m"][n], opt["v"][n] = self._numpy(s["exp_avg"]), self._numpy(s["exp_avg_sq"])
            s = self.muon.state.get(p) if self.muon is not None else None
            if s:
                opt["m"][n] = self._numpy(s["momentum_buffer"])  # v stays zero: Muon keeps one buffer
        return params, opt

    @torch.no_grad()
    def load_state(self, params: dict[str, np.ndarray], opt_state: dict) -> None:
        check_params(self.cfg, params)
        check_optimizer(opt_state, self.optimizer_name)
        load_numpy(self.module, params)  # in place: a recorded step still reads these parameters
        self.decoder = None
        self.optimizer.state.clear()
        if self.muon is not None:
            self.muon.state.clear()
        if self.step_graph is not None:
            self.step_graph.reset()  # it would update the replaced moments
        step = int(opt_state["step"])
        if step == 0:
            return  # a fresh optimizer: torch creates zero moments at the first step
        fused = self.device.type == "cuda"
        for n, p in self.module.named_parameters():
            as_p = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, p.dtype)  # noqa: E731
            if self.muon is not None and optim_spec.is_muon(n, p):
                self.muon.state[p] = {"momentum_buffer": as_p(opt_state["m"][n])}
                continue
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=self.device if fused else "cpu"),
                "exp_avg": as_p(opt_state["m"][n]), "exp_avg_sq": as_p(opt_state["v"][n])}

    # ---- decoding (backends/cuda/decode.py) ------------------------------------------------------
    def prefill(self, tokens, max_len: int | None = None) -> np.ndarray:
        from diffattn import decode as spec_decode
        from backends.cuda.decode import Decoder

        t = self._tokens(tokens, (2,), "tokens")
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        try:
            spec_decode.check_lengths(self.cfg, t.shape[0], max_len)
        except ValueError as e:
            raise BackendError(f"prefill: {e}") from None
        if t.shape[1] > max_len:
            raise BackendError(f"prefill: a prompt of {t.shape[1]} tokens exceeds the cache's {max_len}")
        if self.decoder is None:
            cdt = torch.bfloat16 if self.dtype == "bfloat16" else self.param_dtype
            self.decoder = Decoder(self.module, cdt, self.kernels, self.compile, self.graphs)
        return self._numpy(self.decoder.prefill(t, max_len))

    def decode_step(self, tokens) -> np.ndarray:
        if self.decoder is None or self.decoder.pos == 0:
            raise BackendError("decode_step before prefill (or after a train_step / load_state): prefill first")
        t = self._tokens(np.asarray(tokens).reshape(-1, 1), (2,), "tokens")
        if t.shape[0] != self.decoder.batch:
            raise BackendError(f"decode_step: {t.shape[0]} tokens for a cache of {self.decoder.batch} rows")
        if self.decoder.pos >= self.decoder.max_len:
            raise BackendError(f"decode_step: the cache's {self.decoder.max_len} positions are full")
        return self._numpy(self.decoder.step(t[:, 0]))
