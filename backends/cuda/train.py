"""The training side of the CUDA backend: the Model protocol over a Transformer, AdamW, the step.

AdamW is torch.optim.AdamW in two parameter groups (weight decay on matrices only, as
diffattn.optim.decays) after torch.nn.utils.clip_grad_norm_: together exactly diffattn.optim's
adamw_step (checked step by step against the numpy backend in tests/test_cuda_backend.py).
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
from diffattn.backend import BackendError
from diffattn.config import AdamWConfig, ModelConfig
from diffattn.params import check_params
from backends.cuda.model import build_transformer, load_numpy

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.float32}
# Inductor compiles Triton kernels, ours among them, with debug = assert_indirect_indexing, and
# Triton's debug mode guards every int32 add and multiply with an overflow assert (docs/kernels.md, v6)
COMPILE_OPTIONS = {"assert_indirect_indexing": False}


def make_adamw(module: torch.nn.Module, cfg: AdamWConfig, fused: bool, lr=0.0) -> torch.optim.AdamW:
    """lr: a float, set per step; or a CUDA tensor that a captured step reads at every replay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (decay if optim_spec.decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {"foreach": True}
    if isinstance(lr, torch.Tensor):
        kw["capturable"] = True  # the step count stays on the GPU, and the update never syncs
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)


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
                 kernel_options=None):
        check_params(cfg, params)
        self.cfg, self.optim_cfg, self.device, self.dtype = cfg, optim_cfg, device, dtype
        self.param_dtype = TORCH_DTYPES[dtype]
        self.module = build_transformer(cfg, kernels, kernel_options).to(device=device, dtype=self.param_dtype)
        load_numpy(self.module, params)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.lr = torch.zeros((), dtype=torch.float32, device=device) if graphs else 0.0
        self.optimizer = make_adamw(self.module, optim_cfg, fused=device.type == "cuda", lr=self.lr)
        self.step_graph = StepGraph(self._step) if graphs else None
        if compile:  # each block (forward and its backward); all blocks share one compiled graph
            for block in self.module.layers:
                block.compile(options=COMPILE_OPTIONS)

    # ---- helpers ---------------------------------------------------------------------------
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

    def _loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self.autocast():
            return self.module(batch[:, :-1], batch[:, 1:], reduction=reduction)

    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        out = t.detach().to("cpu", torch.float64 if self.dtype == "float64" else torch.float32)
        return out.numpy().copy()

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
        if self.step_graph is None:
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)
            return self._step(b)
        self.lr.fill_(lr)  # outside the graph: a recorded fill would replay the first step's lr
        return self.step_graph(b)

    def _step(self, b: torch.Tensor) -> torch.Tensor:
        """One update at the optimizer's lr: the mean loss of b's micro-batches, backward, clip, AdamW."""
        micro = b if b.ndim == 3 else b[None]
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device, dtype=torch.float64 if self.dtype == "float64" else torch.float32)
        for mb in micro:
            loss = self._loss(mb)
            (loss / len(micro)).backward()
            total += loss.detach()
        if self.optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optim_cfg.grad_clip, foreach=True)
        self.optimizer.step()
        return total / len(micro)

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        params = {n: self._numpy(p) for n, p in self.module.named_parameters()}
        opt = optim_spec.init_state(params)
        for n, p in self.module.named_parameters():
            s = self.optimizer.state.get(p)
            if s:
                opt["step"] = int(s["step"])
                opt["m"][n], opt["v"][n] = self._numpy(s["exp_avg"]), self._numpy(s["exp_avg_sq"])
        return params, opt

    @torch.no_grad()
    def load_state(self, params: dict[str, np.ndarray], opt_state: dict) -> None:
        check_params(self.cfg, params)
        load_numpy(self.module, params)  # in place: a recorded step still reads these parameters
        self.optimizer.state.clear()
        if self.step_graph is not None:
            self.step_graph.reset()  # it would update the replaced moments
        step = int(opt_state["step"])
        if step == 0:
            return  # a fresh optimizer: torch creates zero moments at the first step
        fused = self.device.type == "cuda"
        for n, p in self.module.named_parameters():
            as_p = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, p.dtype)  # noqa: E731
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=self.device if fused else "cpu"),
                "exp_avg": as_p(opt_state["m"][n]), "exp_avg_sq": as_p(opt_state["v"][n])}
