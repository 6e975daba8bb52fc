"""Cross-stack agreement: the same initial weights and batches on MLX and on PyTorch.

Per variant (tiny preset, builtin:pydoc bytes, batch 4 x 64, float32 on each framework's best
device, diffattn.paired.run_agree): the relative error ||mlx - torch|| / ||torch|| of the logits
at init, and the max |loss_mlx - loss_torch| over a fixed run of STEPS AdamW steps. Both are
lower-is-better. A machine without both frameworks skips. One setup_cache pass measures all
variants; the tracks only read it.
"""
from . import _common as C

STEPS = 20


def _measure(variant):
    from diffattn import data, paired
    from diffattn.config import TrainConfig, preset

    backends = [C.load_backend(C.Runtime(b), dtype="float32") for b in ("mlx", "torch")]
    tcfg = TrainConfig(batch_size=4, seq_len=64, steps=STEPS, warmup_steps=5, eval_every=STEPS)
    r = paired.run_agree(preset("tiny", attention=variant), tcfg, data.load("builtin:pydoc"), backends)
    return {"logits_rel_err": r["logits_rel_err"], "max_abs_loss_diff": r["max_abs_loss_diff"]}


class Agreement:
    params = (list(C.VARIANTS),)
    param_names = ["variant"]
    timeout = 600
    version = "1"

    def setup_cache(self):
        return C.measure_all([(v,) for v in C.VARIANTS], _measure)

    def setup(self, cache, variant):
        self.entry = C.cached_entry(cache, (variant,))

    def track_logits_rel_err_at_init(self, cache, variant):
        return self.entry["logits_rel_err"]
    track_logits_rel_err_at_init.unit = "relative error"

    def track_max_abs_loss_diff(self, cache, variant):
        return self.entry["max_abs_loss_diff"]
    track_max_abs_loss_diff.unit = "nats"
