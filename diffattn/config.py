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

`diff_heads` picks DIFF V1's layout: "split" is the paper's (the table above); "double" gives each
DIFF head two maps of width d_model/n_heads over a V of that same width (2*n_heads q heads,
2*n_kv_heads k heads, n_kv_heads v heads of head_dim): the layout that converting vanilla(n_heads)
by adding a negative map to every head produces (diffattn/hf.py). `diff_subln=False` drops DIFF
V1's per-head RMSNorm and its (1 - lambda_init) scale: the output is A1 V - lambda A2 V itself.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ATTENTIONS = ("vanilla", "diff", "diff_v2")
DIFF_HEADS = ("split", "double")


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
    diff_heads: str = "split"  # DIFF V1 layout: "split" (the paper's) | "double" (see the module doc)
    diff_subln: bool = True  # DIFF V1: subln(o) * (1 - lambda_init); False: o

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
        return per_head // 2 if self._split_diff else per_head

    @property
    def _split_diff(self) -> bool:
        return self.attention == "diff" and self.diff_heads == "split"

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
        return 2 * self.head_dim if self._split_diff else self.head_dim

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def lambda_init(self, layer: int) -> float:
        """DIFF V1 lambda_init(depth), depth the 0-based layer index."""
        return 0.8 - 0.6 * math.exp(-0.3 * layer)

    def num_params(self) -> int:
        """Counted from the shapes of a 1- and a 2-layer model (every layer has the same shapes),
        so a config with a million layers is sized without listing its tensors."""
        from diffattn.params import param_shapes

        def count(cfg):
            return sum(math.prod(s) for s in param_shapes(cfg).values())

        if self.n_layers <= 2:
            return count(self)
        one, two = count(dataclasses.replace(self, n_layers=1)), count(dataclasses.replace(self, n_layers=2))
        return one + (self.n_layers - 1) * (two - one)

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
        need(self.diff_heads in DIFF_HEADS, f"diff_heads={self.diff_heads!r}, expected one of {DIFF_HEADS}")
        need(isinstance(self.diff_subln, bool), f"diff_subln={self.diff_subln!r} must be true or false")
        split = 2 * self.n_heads if self._split_diff else self.n_heads
        need(self.d_model % split == 0,
             f"d_model={self.d_model} is not divisible by {split} "
             f"({'2*' if self._split_diff else ''}n_heads for attention={self.attention!r})")
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
        if self._split_diff:
            heads, kv = 2 * heads, 2 * kv
        if attention == "diff" and self.diff_heads == "split":
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


SCHEDULES = ("cosine", "linear")  # the decay after warmup (diffattn.optim.lr_at)


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
    lambda_warmup_steps: int = 0  # the negative map's weight (lambda_mix) ramps 0 -> 1 over these steps
    seed: int = 0  # parameter init
    data_seed: int = 0  # batch order
    optim: AdamWConfig = field(default_factory=AdamWConfig)
    schedule: str = "cosine"  # after warmup, decay to lr * min_lr_ratio: one of SCHEDULES
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
        if not (isinstance(self.lambda_warmup_steps, int) and self.lambda_warmup_steps >= 0):
            raise ConfigError(f"invalid TrainConfig: lambda_warmup_steps={self.lambda_warmup_steps!r} must be an "
                              "integer >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError(f"invalid TrainConfig: need a finite lr > 0 (got {self.lr!r}), 0 <= min_lr_ratio <= 1, "
                              "warmup_steps >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"invalid TrainConfig: schedule={self.schedule!r}, expected one of {SCHEDULES}")


# Presets. Sizes with the default byte vocabulary (256), DIFF variant:
#   tiny    d 64,   2 layers,  2 DIFF heads of 16  ->   ~0.1M params, trains in seconds on a CPU
#   small   d 256,  4 layers,  4 DIFF heads of 32  ->   ~3.2M params
#   stage0  d 512, 10 layers,  4 DIFF heads of 64  ->  ~32M params
#   stage1  d 1024, 13 layers, 8 DIFF heads of 64  -> ~162M params (stage1-short: the same model)
# (`diffattn.config.describe_presets()` prints the exact counts.)
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=2, max_seq_len=64),
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "stage0": ModelConfig(d_model=512, n_layers=10, n_heads=4, max_seq_len=1024),
    "stage1": ModelConfig(d_model=1024, n_layers=13, n_heads=8, ffn_hidden=2688, max_seq_len=2048),
}
PRESETS["stage1-short"] = PRESETS["stage1"]  # the stage1 model and context on a shorter recipe


@dataclass(frozen=True)
class Recipe:
    """How a preset is trained: what `diffattn train/paired --preset NAME` runs unless a flag
    overrides a field. The length is `steps`, or `tokens` (steps = ceil(tokens / tokens per
    step)); exactly one is set. Eval reads `eval_tokens` of the validation split every
    `eval_every` steps (as batches of the training shape: eval_batches = ceil(eval_tokens /
    (batch_size * seq_len))). lr is the peak, reached after `warmup_steps` of linear warmup,
    then `schedule` decays it to lr * min_lr_ratio at the last step (diffattn.optim.lr_at).
    `optimizer` and `packing` are TrainConfig's (OPTIMIZERS, PACKINGS): every preset's recipe is
    AdamW over random windows, and `--optimizer` / `--packing` make the other recipe of a preset."""
    seq_len: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_tokens: int
    steps: int | None = None
    tokens: int | None = None
    grad_accum: int = 1
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    optimizer: str = "adamw"
    packing: str = "random"

    def __post_init__(self):
        if (self.steps is None) == (self.tokens is None):
            raise ConfigError(f"invalid Recipe: give steps or tokens, not {'both' if self.steps else 'neither'}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "eval_tokens"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"invalid Recipe: {name}={v!r} must be a positive integer")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"invalid Recipe: schedule={self.schedule!r}, expected one of {SCHEDULES}")
        if self.optimizer not in OPTIMIZERS or self.packing not in PACKINGS:
            raise ConfigError(f"invalid Recipe: optimizer={self.optimizer!r}, packing={self.packing!r}, expected "
                              f"one of {OPTIMIZERS} and one of {PACKINGS}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.tokens / self.tokens_per_step)

    def eval_batches(self, batch_size: int, seq_len: int) -> int:
        """Batches of batch_size x seq_len holding at least eval_tokens target tokens."""
        return max(1, math.ceil(self.eval_tokens / (batch_size * seq_len)))


# tiny and small: CPU-sized, the defaults of README command one (600 steps of 16 x 64 tokens,
# eval 8 batches of 16 x 64 every 100 steps).
CPU_RECIPE = Recipe(seq_len=64, batch_size=16, steps=600, lr=3e-3, warmup_steps=50, eval_every=100,
                    eval_tokens=8 * 16 * 64)
# stage1: diff-mlx's Stage 1 (2.0B tokens at context 2048, batch 32, peak lr 4e-4, 1000 warmup
# steps, cosine): 30,518 steps of 65,536 tokens. Eval 2^20 tokens every 1000 steps costs ~0.5% of
# the training compute (16 forward batches, ~1/3 of a step each, per 1000 steps).
STAGE1_RECIPE = Recipe(seq_len=2048, batch_size=32, tokens=2_000_000_000, lr=4e-4, warmup_steps=1000,
                       eval_every=1000, eval_tokens=1 << 20)
RECIPES: dict[str, Recipe] = {
    "tiny": CPU_RECIPE,
    "small": CPU_RECIPE,
    # stage0: diff-mlx's Stage 0 length and context (100M tokens at 1024). Batch 32 x 1024 tokens
    # (3,052 steps): a 30M model reaches its loss regime well within this batch size, and many
    # steps matter more than large batches at 100M tokens. Peak lr 2e-3 with cosine to 10%:
    # AdamW models of ~30M parameters train stably at 1e-3..3e-3 (the LR that scaling-law sweeps
    # find grows as models shrink; 6e-4 is GPT-3 Small's at 125M and half a million tokens per
    # batch); 2e-3 sits mid-range and is shared by both twins, tuned for neither. Warmup 200 steps
    # (6.5%). Eval 2^20 tokens every 500 steps: 7 evals of 32 forward batches, ~2.5% of training.
    "stage0": Recipe(seq_len=1024, batch_size=32, tokens=100_000_000, lr=2e-3, warmup_steps=200,
                     eval_every=500, eval_tokens=1 << 20),
    "stage1": STAGE1_RECIPE,
    # stage1-short: Stage 1's model, context, batch and peak lr on a budget of about 20 GPU-minutes
    # per arm: 300M tokens at ~250k tokens/s (stage1 compiled, bf16, one H100). Change `tokens`
    # for another budget. 4,578 steps; warmup 400 (stage1's 1000 would be 22% of the run).
    "stage1-short": dataclasses.replace(STAGE1_RECIPE, tokens=300_000_000, warmup_steps=400, eval_every=500),
}


def recipe(name: str) -> Recipe:
    """The training recipe of a preset."""
    if name not in RECIPES:
        raise ConfigError(f"unknown preset {name!r}, expected one of {tuple(RECIPES)}")
    return RECIPES[name]


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
            rows.append(f"{name:12s} {att:8s} d={c.d_model:5d} L={c.n_layers:3d} heads={c.n_heads:3d} "
                        f"kv={c.kv_heads:3d} head_dim={c.head_dim:4d} ffn={c.ffn_dim:5d} params={c.num_params():,}")
    return "\n".join(rows)


# ---- configs from data (a run manifest's model_config / train_config) -------------------------

def model_config_from(d: dict) -> ModelConfig:
    return ModelConfig(**d)


def train_config_from(d: dict) -> TrainConfig:
    d = dict(d)
    d["optim"] = AdamWConfig(**d.get("optim", {}))
    d["muon"] = MuonConfig(**d.get("muon", {}))
    return TrainConfig(**d)
