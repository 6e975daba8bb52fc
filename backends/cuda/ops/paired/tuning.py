"""The paired-softmax kernels' launch choices: tile tables and the options a caller passes in.

KernelOptions is frozen: a model, a benchmark or a test builds one and passes it down
(diff_v1_attention(..., options=...)); nothing here is mutated at run time. The defaults are
what the model runs.

Block shapes per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_M the query block,
BLOCK_N the key block. The diagonal loops need the resident block to be a multiple of the walked
one (fwd, dq: BLOCK_M % BLOCK_N == 0; dkdv: BLOCK_N % BLOCK_M == 0). The float32 accumulators set
the budget (at most ~128 registers a thread): the forward holds two (BLOCK_M, DV), dK/dV one
(BLOCK_N, DV + D or 2D), dQ two (BLOCK_M, D). Float32 inputs (for accuracy checks) get small
tiles so K/V stages fit in shared memory. TUNED holds the 16-bit shapes measured best by
benchmarks/scripts/kernels_sweep.py on the H100 and, for d 64, again on the H200 at L = 2k/8k/16k
with TMA loads (docs/kernels.md); other shapes follow the rules in blocks().
"""
from __future__ import annotations

import dataclasses
import hashlib


KERNELS = ("fwd", "dkdv", "dq")  # the kernels a tile can be given for (the deltas' passes have fixed rules)

TUNED = {  # (kernel, D, DV) -> tile, 16-bit inputs
    ("fwd", 64, 128): (128, 64, 8, 3),
    ("fwd", 64, 64): (64, 64, 4, 3),
    ("fwd", 128, 256): (128, 64, 8, 3),  # per column slice of 128 (FWD_SLICES)
    ("fwd", 128, 128): (128, 64, 8, 4),
    ("dkdv", 64, 128): (32, 64, 4, 3),  # small enough for two CTAs an SM, which the sweep found fastest
    ("dkdv", 64, 64): (64, 128, 8, 3),
    ("dkdv", 128, 256): (32, 128, 8, 2),
    ("dq", 64, 128): (64, 64, 4, 2),
    ("dq", 64, 64): (64, 64, 4, 3),
    ("dq", 128, 256): (128, 32, 8, 2),
    ("dq", 128, 128): (64, 32, 4, 2),
}
# Forward column slices: DIFF V1 at d 128 has V 256 wide, and two (BLOCK_M, 256) accumulators spill;
# two programs per query block, each owning 128 columns, recompute the scores (+33% FLOPs) instead.
FWD_SLICES = {(128, 256, 2): 2}  # (D, DV, itemsize) -> column slices
# Where the dK/dV kernel walks its diagonal query blocks, per (D, DV) of 16-bit inputs. With "first",
# ptxas waits for every wgmma before issuing the next (its advisory C7515) but allocates with the
# fewest spills; "last" and "unrolled" keep the MMAs asynchronous at the price of more spills, which
# pays only on tiles with registers to spare.
DKDV_DIAGONAL = {(64, 128): "unrolled", (64, 64): "unrolled"}
DIAGONALS = ("first", "unrolled", "last")
# dK/dV launch order: group pairs only where at least this many pairs' rows fit half the L2
PAIRS_TOGETHER_MIN = 8


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How the paired-softmax kernels launch; every choice changes speed, none the math beyond
    summation order.

    tma                 forward and dQ load K/V tiles through tensor descriptors (Hopper's bulk copy
                        engine) where the inputs allow it, else pointer arithmetic
    diagonal            None: DKDV_DIAGONAL's choice; "first" / "unrolled" / "last" forces one
    dkdv_ws             V2's warp-specialized Gluon dK/dV kernel where it applies
    dq_ws               the Gluon dQ kernel (V1 and V2) where it applies, V2's from dq_ws_v2_min_len keys on
    dq_ws_v2_min_len    below it the Triton dQ is faster for V2
    dkdv_pairs_together the Triton dK/dV grid's launch order: "auto" (pairs_together) or a number
    tiles               ((kernel, D, DV, itemsize), (BLOCK_M, BLOCK_N, warps, stages)) pairs over TUNED
    fwd_slices          ((D, DV, itemsize), slices) pairs over FWD_SLICES
    """
    tma: bool = True
    diagonal: str | None = None
    dkdv_ws: bool = True
    dq_ws: bool = True
    dq_ws_v2_min_len: int = 4096
    dkdv_pairs_together: int | str = "auto"
    tiles: tuple = ()
    fwd_slices: tuple = ()
    # a short name of these options, stable across processes ('' for the defaults): the ops' suffix.
    # Computed once here, so that torch.compile reads a constant string where it traces a call
    tag: str = dataclasses.field(init=False, compare=False, repr=False, default="")

    def __post_init__(self):
        if self.diagonal not in (None, *DIAGONALS):
            raise ValueError(f"kernel option diagonal must be one of {DIAGONALS} or None, got {self.diagonal!r}")
        if self.dkdv_pairs_together != "auto" and not (isinstance(self.dkdv_pairs_together, int)
                                                       and self.dkdv_pairs_together >= 1):
            raise ValueError(f"kernel option dkdv_pairs_together must be 'auto' or a positive int, "
                             f"got {self.dkdv_pairs_together!r}")
        for key, tile in self.tiles:
            if len(key) != 4 or key[0] not in KERNELS and key[0] not in ("delta", "norm_delta") or len(tile) != 4:
                raise ValueError(f"bad tile {key}: {tile}, expected ((kernel, D, DV, itemsize), (BM, BN, warps, stages))")
        default = not any(getattr(self, f.name) != f.default for f in dataclasses.fields(self) if f.init)
        object.__setattr__(self, "tag", "" if default else hashlib.sha1(repr(self).encode()).hexdigest()[:10])

    def replace(self, **changes) -> KernelOptions:
        return dataclasses.replace(self, **changes)

    def with_tiles(self, tiles: dict) -> KernelOptions:
        """These options with tiles {(kernel, D, DV, itemsize): tile} over TUNED (later ones win)."""
        merged = {**dict(self.tiles), **{tuple(k): tuple(v) for k, v in tiles.items()}}
        return self.replace(tiles=tuple(sorted(merged.items())))

    def text(self) -> str:
        """The launch options that differ from the defaults as 'KEY=VALUE+...' (parse_options' form);
        tiles and slices not included (format_tiles)."""
        scalar = OPTION_NAMES
        return "+".join(f"{n}={_show(getattr(self, n))}" for n in scalar if getattr(self, n) != getattr(DEFAULT, n))


DEFAULT = KernelOptions()
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(KernelOptions) if f.init and f.name not in ("tiles", "fwd_slices"))


def _show(value):
    return {True: "1", False: "0"}.get(value, value) if isinstance(value, bool) else value


def parse_options(text: str, base: KernelOptions = DEFAULT) -> KernelOptions:
    """'tma=0+diagonal=last' -> base with those options (1 / 0 are booleans, other whole numbers
    ints, the rest strings). An option KernelOptions does not have is an error; empty text is base."""
    if not text:
        return base
    given = {k: {"1": True, "0": False}.get(v, int(v) if v.isdigit() else v)
             for k, v in (item.split("=") for item in text.split("+"))}
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown kernel option(s) {unknown}, expected {OPTION_NAMES}")
    return base.replace(**given)


def parse_tiles(text: str, base: KernelOptions = DEFAULT) -> KernelOptions:
    """'KERNEL:D:DV=BM,BN,warps,stages+...' -> base with those 16-bit tiles over TUNED."""
    tiles = {}
    for item in filter(None, text.split("+")):
        try:
            key, tile = item.split("=")
            kernel, D, DV = key.split(":")
            cfg = tuple(int(x) for x in tile.split(","))
            assert kernel in KERNELS and len(cfg) == 4
        except (ValueError, AssertionError):
            raise ValueError(f"bad tile {item!r}, expected KERNEL:D:DV=BM,BN,warps,stages with KERNEL in "
                             f"{KERNELS}, e.g. dkdv:64:128=32,128,8,3") from None
        tiles[(kernel, int(D), int(DV), 2)] = cfg
    return base.with_tiles(tiles) if tiles else base


def blocks(kernel, D, DV, dtype, shared_k, options: KernelOptions = DEFAULT):
    """The tile of one kernel for these head dims and input dtype."""
    tiles = dict(options.tiles)
    if (kernel, D, DV, dtype.itemsize) in tiles:  # before the interpreter's: tests give other tiles too
        return tiles[(kernel, D, DV, dtype.itemsize)]
    from ..triton_runtime import INTERPRETED  # a launcher asks, so the kernels are imported already

    if INTERPRETED:  # the norm pass walks 2 blocks a program, so the loop is tested
        return (16, 2, 4, 2) if kernel == "norm_delta" else (16, 1, 4, 1) if kernel == "delta" else (16, 16, 4, 1)
    # the deltas' passes: (rows per block, blocks per program, warps, load stages)
    if kernel == "delta":
        return 64, 1, 4, 1
    if kernel == "norm_delta":  # about seven (rows, DV) float32 tiles live: 16 values a thread each; d w's
        return max(1, 2048 // DV), 8, 4, 3  # cross-warp sum once per 8 blocks, loads prefetched
    if dtype.itemsize == 4:
        return {"fwd": (32, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 32, 4, 1)}[kernel]
    if (kernel, D, DV) in TUNED:
        return TUNED[(kernel, D, DV)]
    if kernel == "fwd":
        return (128, 64, 8, 3) if 2 * DV <= 256 else (64, 32, 8, 2)
    if kernel == "dkdv":
        return (64, 128, 8, 2) if DV + (1 if shared_k else 2) * D <= 256 else (32, 128, 8, 2)
    return (64, 64, 4, 2) if 2 * D <= 128 else (64, 32, 8, 2)  # dq


def fwd_slices(D, DV, dtype, options: KernelOptions = DEFAULT):
    """How many column slices of V the forward splits into (programs per query block)."""
    return {**FWD_SLICES, **dict(options.fwd_slices)}.get((D, DV, dtype.itemsize), 1)


def dkdv_diagonal(D, DV, dtype, options: KernelOptions = DEFAULT):
    """Where the dK/dV kernel walks its diagonal query blocks: the options' forced choice, else
    DKDV_DIAGONAL's for 16-bit inputs, else "first"."""
    return options.diagonal or (DKDV_DIAGONAL.get((D, DV), "first") if dtype.itemsize == 2 else "first")


def pairs_together(pairs, pair_bytes, l2_bytes, options: KernelOptions = DEFAULT):
    """How many of `pairs` (batch, kv head) pairs the dK/dV grid runs heaviest block first together
    (bwd.dkdv_launch_order): the most that divide `pairs` evenly and have their Q and dO rows
    (pair_bytes), which each of a pair's key blocks streams, fit in half the L2; 1 (the grid's
    order) where fewer than PAIRS_TOGETHER_MIN fit. The options may fix the number. Measured on the
    H200 (docs/kernels.md): a short last group starts its heaviest blocks in the last wave again
    (30 of the step's 64 pairs ran slower than 16); where only 2-4 pairs fit (L >= 8k) grouping ran
    V1 d64 and V2 d128 up to 4% slower; every pair at once ran slower at 8k."""
    if options.dkdv_pairs_together != "auto":
        return int(options.dkdv_pairs_together)
    fit = min(pairs, l2_bytes // 2 // pair_bytes)
    if fit < min(pairs, PAIRS_TOGETHER_MIN):
        return 1
    return next(p for p in range(fit, 0, -1) if pairs % p == 0)
