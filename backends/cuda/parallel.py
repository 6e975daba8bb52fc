"""Data-parallel and sharded training on PyTorch's own engines: DDP and FSDP2, launched by torchrun.

    torchrun --nproc-per-node N -m diffattn.cli train --backend cuda --parallel ddp|fsdp ...

Every rank runs the same harness loop and draws the same global batch (a function of data_seed
and step); `train_step` keeps this rank's contiguous slice of its rows, so N processes see
exactly the batches one process would. The framework reduces the gradients: DDP all-reduces
them (averaged) during backward; FSDP2 (torch.distributed.fsdp.fully_shard, each block and the
root) shards parameters, gradients and AdamW moments over the ranks and reduce-scatters the
gradients. Muon (--optimizer muon) runs under DDP only: every rank orthogonalises the whole,
already averaged gradient matrices alike, where FSDP would hand it one shard of each matrix,
whose Newton-Schulz is not the matrix's. The loss a step returns is all-reduced to the global
batch's mean, so every rank logs, stops and detects divergence alike. Rank 0 is the writer (metrics, checkpoints).

`state()` gives every rank the full state (FSDP: gathered one tensor at a time with
DTensor.full_tensor, as get_model_state_dict(full_state_dict=True) would, without holding every
full tensor on the GPU at once), so checkpoints stay the project's single-file safetensors and
a run on N processes resumes on M, 1 included; `load_state` shards the full state again
(distribute_tensor). Evaluation runs on every rank over the whole validation batch (FSDP's
forward is collective), a cost proportional to eval_batches only.

Process groups: NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU (the CI tests). Without
torchrun's environment a world of one is set up, for benchmarks of the wrapper alone.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket

import numpy as np
import torch
import torch.distributed as dist

from diffattn import optim as optim_spec
from diffattn.backend import BackendError, check_optimizer, rank_rows
from backends.cuda.train import CudaModel

MODES = ("none", "ddp", "fsdp")


def launched_world() -> int:
    """The world size torchrun (or any env:// launcher) set for this process; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve(parallel: str | None) -> str:
    """--parallel as given, or its default: ddp under a launcher of several processes, else none."""
    world = launched_world()
    if parallel is None:
        return "ddp" if world > 1 else "none"
    if parallel not in MODES:
        raise BackendError(f"backend 'cuda': unknown parallel {parallel!r}, expected one of {MODES}")
    if parallel == "none" and world > 1:
        raise BackendError(f"backend 'cuda': launched as {world} processes (WORLD_SIZE={world}) with parallel='none': "
                           "every rank would train and write alone; give --parallel ddp or fsdp")
    return parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_type: str) -> tuple[int, int, torch.device | None]:
    """Join (or create) the default process group: (rank, world size, this rank's CUDA device)."""
    if not dist.is_available():
        raise BackendError(f"backend 'cuda': this PyTorch {torch.__version__} has no torch.distributed")
    if "RANK" not in os.environ:  # not launched: a world of one on this host
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = None
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise BackendError(f"backend 'cuda': LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", device_id=device)
        atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size(), device


def _leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over the ranks (a SUM then a divide: gloo has no AVG)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


class _Parallel(CudaModel):
    """What DDP and FSDP share: rank, the batch slice, the global mean loss, the writer."""
    mode = "none"

    def __init__(self, *args, **kwargs):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        super().__init__(*args, **kwargs)
        # every rank has built (and checked its output folder) before any rank writes
        dist.barrier()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def train_step(self, batch, lr: float) -> torch.Tensor:
        local = rank_rows(batch if isinstance(batch, torch.Tensor) else np.asarray(batch), self.rank, self.world)
        return mean_over_ranks(super().train_step(local, lr))


class DDPModel(_Parallel):
    """Every rank holds the whole model; DDP all-reduces gradients in buckets during backward."""
    mode = "ddp"

    def _parallelize(self):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets: backward writes them where the reduction
        # reads, with no copy in and out of the buckets each step
        return DistributedDataParallel(self.module, device_ids=ids, gradient_as_bucket_view=True)

    def _micro_batch(self, last: bool):
        return contextlib.nullcontext() if last else self.step_module.no_sync()


class FSDPModel(_Parallel):
    """Parameters, gradients and AdamW moments sharded over the ranks (FSDP2: each block is one
    unit, the embedding, final norm and head the root's)."""
    mode = "fsdp"

    def _parallelize(self):
        from torch.distributed.fsdp import fully_shard

        if self.optimizer_name != "adamw":  # Newton-Schulz needs whole matrices, FSDP holds shards
            raise BackendError(f"backend 'cuda': --parallel fsdp shards every matrix, and {self.optimizer_name}'s "
                               "Newton-Schulz orthogonalises whole ones: use --parallel ddp or --optimizer adamw")

        # A block frees its gathered parameters after its forward and gathers them again for its
        # backward, which saves memory only where a shard is smaller than the whole: on one rank
        # nothing is resharded. The last block's backward follows its forward at once: kept gathered.
        last = len(self.module.layers) - 1
        for i, block in enumerate(self.module.layers):
            fully_shard(block, reshard_after_forward=self.world > 1 and i < last)
        fully_shard(self.module)
        return self.module

    def _micro_batch(self, last: bool):
        self.module.set_requires_gradient_sync(last)  # reduce-scatter at the last micro-batch only
        return contextlib.nullcontext()

    def loss_and_grads(self, batch):
        raise BackendError("loss_and_grads is a single-process check: run it without --parallel fsdp")

    def _sharded(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters as their shards (DTensors): the root stays gathered after a forward."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        return list(self.module.named_parameters())

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The full state on every rank (collective: every rank must call it)."""
        named = self._sharded()
        params = {n: self._numpy(p.full_tensor()) for n, p in named}
        opt = optim_spec.init_state(params)
        for n, p in named:
            s = self.optimizer.state.get(p)
            if s:
                opt["step"] = int(s["step"])
                opt["m"][n], opt["v"][n] = self._numpy(s["exp_avg"].full_tensor()), self._numpy(s["exp_avg_sq"].full_tensor())
        return params, opt

    @torch.no_grad()
    def load_state(self, params: dict[str, np.ndarray], opt_state: dict) -> None:
        from torch.distributed.tensor import distribute_tensor

        from diffattn.params import check_params

        check_params(self.cfg, params)
        check_optimizer(opt_state, self.optimizer_name)

        def shard_like(p, a):  # every rank holds the full array: it keeps its shard, no communication
            full = torch.from_numpy(np.ascontiguousarray(a)).to(self.device, p.dtype)
            return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)

        named = self._sharded()
        for n, p in named:
            p.to_local().copy_(shard_like(p, params[n]).to_local())
        self.optimizer.state.clear()
        step = int(opt_state["step"])
        if step == 0:
            return
        fused = self.device.type == "cuda"
        for n, p in named:
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=self.device if fused else "cpu"),
                "exp_avg": shard_like(p, opt_state["m"][n]), "exp_avg_sq": shard_like(p, opt_state["v"][n])}


MODELS = {"ddp": DDPModel, "fsdp": FSDPModel}
