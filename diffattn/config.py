"""Model and training configuration: plain dataclasses, named presets, one-line validation.

Head layout, as the paper counts it (a DIFF model uses half the heads of its vanilla
twin with identical projection shapes):

| attention | n_heads means                 | head_dim            | q heads    | k/v heads (v dim)          |
| --------- | ----------------------------- | ------------------- | ---------- | -------------------------- |
| vanilla   | attention heads               | d_model / n_heads   | n_heads    | n_kv_heads (head_dim)      |
| diff      | DIFF heads (2 softmax maps)   | d_model / n_heads/2 | 2*n_heads  | 2*n_kv_heads (v: n_kv_heads of 2*head_dim) |
| diff_v2   | output heads (2 query heads)  | d_model / n_heads   | 2*n_heads  | n_kv_heads (head_dim)      |

So vanilla(n_heads=2h) and diff(n_heads=h) have identical q/k/v/out shapes; diff_v2(n_heads=h)
shares k/v/out with vanilla(n_heads=h) and doubles q.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ATTENTIONS = ("vanilla", "diff", "diff_v2")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model or run (message is one line)."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int | None = None  # None: same as n_heads (MHA)
    attention: str = "diff"
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 64
    init_std: float = 0.02

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """Dimension of one query/key head (one softmax map)."""
        per_head = self.d_model // self.n_heads
        return per_head // 2 if self.attention == "diff" else per_head

    @property
    def q_heads(self) -> int:
        """Number of query heads of width head_dim."""
        return self.n_heads if self.attention == "vanilla" else 2 * self.n_heads

    @property
    def k_heads(self) -> int:
        """Number of key heads of width head_dim."""
        return 2 * self.kv_heads if self.attention == "diff" else self.kv_heads

    @property
    def v_head_dim(self) -> int:
        return 2 * self.head_dim if self.attention == "diff" else self.head_dim

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def lambda_init(self, layer: int) -> float:
        """DIFF V1 lambda_init(depth), depth the 0-based layer index."""
        return 0.8 - 0.6 * math.exp(-0.3 * layer)

    def num_params(self) -> int:
        from diffattn.params import param_shapes

        return sum(math.prod(s) for s in param_shapes(self).values())

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"invalid ModelConfig: {msg}")

        need(self.attention in ATTENTIONS, f"attention={self.attention!r}, expected one of {ATTENTIONS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name}={v!r} must be a positive integer")
        kv = self.kv_heads
        need(isinstance(kv, int) and kv > 0, f"n_kv_heads={self.n_kv_heads!r} must be a positive integer or None")
        split = 2 * self.n_heads if self.attention == "diff" else self.n_heads
        need(self.d_model % split == 0,
             f"d_model={self.d_model} is not divisible by {split} "
             f"({'2*' if self.attention == 'diff' else ''}n_heads for attention={self.attention!r})")
        need(self.n_heads % kv == 0, f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(self.ffn_dim > 0, f"ffn_hidden={self.ffn_hidden!r} must be positive")
        need(self.rope_theta > 0 and self.norm_eps > 0 and self.init_std > 0,
             "rope_theta, norm_eps and init_std must be positive")

    # ---- twins -----------------------------------------------------------------------
    def twin(self, attention: str) -> "ModelConfig":
        """The matched config with another attention variant (same projection shapes)."""
        if attention not in ATTENTIONS:
            raise ConfigError(f"unknown attention {attention!r}, expected one of {ATTENTIONS}")
        # go through the vanilla layout: diff halves its heads, diff_v2 keeps them
        heads, kv = self.n_heads, self.kv_heads
        if self.attention == "diff":
            heads, kv = 2 * heads, 2 * kv
        if attention == "diff":
            if heads % 2 or kv % 2:
                raise ConfigError(f"no DIFF twin: n_heads={heads}, n_kv_heads={kv} must both be even")
            heads, kv = heads // 2, kv // 2
        return dataclasses.replace(self, attention=attention, n_heads=heads,
                                   n_kv_heads=None if kv == heads else kv)


@dataclass(frozen=True)
class AdamWConfig:
    """The optimizer spec (diffattn.optim.adamw_step): every backend implements exactly this."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled, matrices (ndim >= 2) only
    grad_clip: float = 1.0  # global L2 norm; 0 disables


@dataclass(frozen=True)
class MuonConfig:
    """Muon's part of the optimizer spec (diffattn.optim.muon_step): the hidden matrices'
    update when TrainConfig.optimizer is "muon"; every other tensor keeps AdamWConfig's update.
    Defaults and the reasons for them are in diffattn/optim.py's docstring."""
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    ns_eps: float = 1e-7
    ns_dtype: str = "float32"  # or "bfloat16": every Newton-Schulz matmul's inputs rounded to bf16
    weight_decay: float = 0.1  # decoupled, as AdamW's

    def __post_init__(self):
        if not 0 <= self.momentum < 1 or not (isinstance(self.ns_steps, int) and self.ns_steps > 0):
            raise ConfigError(f"invalid MuonConfig: need 0 <= momentum < 1 and ns_steps > 0, got "
                              f"momentum={self.momentum!r}, ns_steps={self.ns_steps!r}")
        if len(self.ns_coefficients) != 3 or self.ns_dtype not in NS_DTYPES:
            raise ConfigError(f"invalid MuonConfig: ns_coefficients needs 3 values and ns_dtype one of {NS_DTYPES}")
        object.__setattr__(self, "ns_coefficients", tuple(float(c) for c in self.ns_coefficients))


OPTIMIZERS = ("adamw", "muon")
PACKINGS = ("random", "bos-best-fit")
NS_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8
    seq_len: int = 64
    grad_accum: int = 1
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0  # parameter init
    data_seed: int = 0  # batch order
    optim: AdamWConfig = field(default_factory=AdamWConfig)
    optimizer: str = "adamw"  # "muon": MuonConfig for hidden matrices, AdamW for the rest (optim.py)
    muon: MuonConfig = field(default_factory=MuonConfig)
    packing: str = "random"  # "bos-best-fit": whole documents, BOS-aligned (diffattn/packing.py)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"invalid TrainConfig: optimizer={self.optimizer!r}, expected one of {OPTIMIZERS}")
        if self.packing not in PACKINGS:
            raise ConfigError(f"invalid TrainConfig: packing={self.packing!r}, expected one of {PACKINGS}")
        for name in ("batch_size", "seq_len", "grad_accum", "steps", "eval_batches"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"invalid TrainConfig: {name}={v!r} must be a positive integer")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError("invalid TrainConfig: need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0")


# Presets. Sizes with the default byte vocabulary (256), DIFF variant:
#   tiny    d 64,   2 layers,  2 DIFF heads of 16  ->   ~0.1M params, trains in seconds on a CPU
#   small   d 256,  4 layers,  4 DIFF heads of 32  ->   ~3.2M params
#   stage0  d 512, 10 layers,  4 DIFF heads of 64  ->  ~32M params
#   stage1  d 1024, 13 layers, 8 DIFF heads of 64  -> ~162M params
# (`diffattn.config.describe_presets()` prints the exact counts.)
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=2, max_seq_len=64),
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "stage0": ModelConfig(d_model=512, n_layers=10, n_heads=4, max_seq_len=1024),
    "stage1": ModelConfig(d_model=1024, n_layers=13, n_heads=8, ffn_hidden=2688, max_seq_len=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset ModelConfig, optionally with fields overridden (attention='vanilla' gives the twin)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}, expected one of {tuple(PRESETS)}")
    base = PRESETS[name]
    attention = overrides.pop("attention", None)
    if attention is not None and attention != base.attention:
        base = base.twin(attention)
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as e:
        raise ConfigError(f"invalid override for preset {name!r}: {e}") from None


def describe_presets() -> str:
    rows = []
    for name in PRESETS:
        for att in ATTENTIONS:
            c = preset(name, attention=att)
            rows.append(f"{name:7s} {att:8s} d={c.d_model:5d} L={c.n_layers:3d} heads={c.n_heads:3d} "
                        f"kv={c.kv_heads:3d} head_dim={c.head_dim:4d} ffn={c.ffn_dim:5d} params={c.num_params():,}")
    return "\n".join(rows)
