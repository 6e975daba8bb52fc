"""Paired runs: DIFF (V1 or V2) minus its vanilla twin, from shared init on identical batches.

Per backend x variant, one diffattn.paired.run_paired on builtin:recall (multi-query associative
recall, the retrieval regime DIFF attention claims its gain in), tiny preset, float32, a fixed
budget of STEPS steps (steps, not seconds, so the figure does not depend on the machine's speed):
- track_val_loss_delta: DIFF minus vanilla val loss in nats/token (negative: DIFF is better;
  lower is better);
- track_recall_accuracy_delta: DIFF minus vanilla accuracy on the recalled values (positive:
  DIFF is better; higher is better).
The budget is what a 2-core CPU affords in CI, so at this size the deltas are a regression
signal for the code, not evidence about the architecture (use `diffattn paired` for that).
All runs happen once in setup_cache; the tracks only read it.
"""
from . import _common as C

STEPS = 60
PAIRED_VARIANTS = ("diff", "diff_v2")
DATA = "builtin:recall"


def _measure(backend, variant):
    from diffattn import data, paired
    from diffattn.config import TrainConfig, preset

    be = C.load_backend(C.Runtime(backend), dtype="float32")
    tcfg = TrainConfig(batch_size=8, seq_len=64, steps=STEPS, warmup_steps=6, eval_every=STEPS, eval_batches=4)
    cfg = preset("tiny", attention=variant)
    r = paired.run_paired(cfg, tcfg, data.load(DATA), be, progress=False)
    return {"val_loss_delta": r["delta"]["val_loss"], "recall_accuracy_delta": r["delta"]["accuracy"]}


class Paired:
    params = (list(C.BACKENDS), list(PAIRED_VARIANTS))
    param_names = ["backend", "variant"]
    timeout = 900
    version = "1"

    def setup_cache(self):
        return C.measure_all([(b, v) for b in C.BACKENDS for v in PAIRED_VARIANTS], _measure)

    def setup(self, cache, backend, variant):
        self.entry = C.cached_entry(cache, (backend, variant))

    def track_val_loss_delta(self, cache, backend, variant):
        return self.entry["val_loss_delta"]
    track_val_loss_delta.unit = "nats"

    def track_recall_accuracy_delta(self, cache, backend, variant):
        return self.entry["recall_accuracy_delta"]
    track_recall_accuracy_delta.unit = "accuracy"
