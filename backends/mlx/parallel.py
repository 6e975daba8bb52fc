"""Data-parallel training on MLX's own engine: mx.distributed, launched by mlx.launch.

    mlx.launch -n N -- diffattn train --backend mlx ...                    N processes, this host
    mlx.launch --hostfile hosts.json -- diffattn train --backend mlx ...   several Macs

Every rank runs the same harness loop and draws the same global batch (a function of data_seed
and step); `train_step` keeps this rank's contiguous slice of its rows, so N processes see
exactly the batches one process would. Inside the compiled step the gradients, averaged over
the micro-batches, are averaged over the ranks (mlx.nn.average_gradients: all_sum in buckets,
divided by N), and so is the loss; every rank then takes the same update (AdamW, or Muon on
the averaged hidden matrices) and holds the same full state, which is why checkpoints need no
gather and resume on any number of processes. Rank 0 is the writer (metrics, checkpoints). The communication backend is the one
the launcher set up (ring over TCP on CPUs and Macs; nccl for MLX's CUDA build; jaccl over
Thunderbolt RDMA).
"""
from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from mlx.nn.utils import average_gradients

from diffattn.backend import BackendError, rank_rows
from backends.mlx.backend import MLXModel

MODES = ("none", "ddp")


def launched() -> bool:
    """Started by mlx.launch (which gives every process its MLX_RANK)."""
    return "MLX_RANK" in os.environ


def init(parallel: str | None):
    """The distributed group to train over, or None for one process. parallel None: data
    parallel when mlx.launch started several processes."""
    if parallel not in (None, *MODES):
        raise BackendError(f"backend 'mlx': unknown parallel {parallel!r}, expected one of {MODES} "
                           "(MLX shards no parameters: no fsdp)")
    if parallel == "none" and not launched():
        return None
    try:
        group = mx.distributed.init(strict=launched())
    except RuntimeError as e:
        raise BackendError(f"backend 'mlx': mx.distributed.init failed ({str(e).splitlines()[0]})") from None
    if parallel == "none" and group.size() > 1:
        raise BackendError(f"backend 'mlx': launched as {group.size()} processes with parallel='none': every rank "
                           "would train and write alone; give --parallel ddp or leave it out")
    if parallel is None and group.size() == 1:
        return None
    return group


class DataParallelModel(MLXModel):
    """An MLXModel whose step averages loss and gradients over the group's processes."""

    def __init__(self, group, *args, **kwargs):
        self.group = group
        super().__init__(*args, **kwargs)
        # a barrier: every rank has built (and checked its output folder) before any rank writes
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    @property
    def is_writer(self) -> bool:
        return self.group.rank() == 0

    def reduce(self, loss, grads):
        """make_train_step's hook, traced into the compiled step."""
        n = self.group.size()
        # a list, not the {name: array} dict: average_gradients would read dotted names as a tree
        averaged = average_gradients(list(grads.values()), group=self.group)
        return mx.distributed.all_sum(loss, group=self.group) / n, dict(zip(grads, averaged))

    def train_step(self, batch, lr):
        return super().train_step(rank_rows(np.asarray(batch), self.group.rank(), self.group.size()), lr)
