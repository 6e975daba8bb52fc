"""Paired runs: DIFF (V1 or V2) minus its vanilla twin, from shared init on identical batches,
over two seeds (diffattn.paired.run_paired; each seed its own init and batch order).

Paired (CPU or GPU, both stacks): the tiny preset on builtin:pydoc (English prose, byte tokens),
float32, STEPS steps of 8 x 64 tokens per arm, seeds 0 and 1, eval 8 batches at the end. Tracks,
each the mean over the two seeds (negative: DIFF is better; lower is better):
- track_val_loss_delta: DIFF minus vanilla held-out loss in nats/token;
- track_last_bin_loss_delta: the same in the last eighth of the context (positions 56-63).
At this size the deltas are a regression signal for the code and the data path, not evidence
about the architecture: any change to the model, the optimizer, the batches or the data moves
them. Steps, not seconds, so the figures do not depend on the machine's speed.

PairedCorpus (GPU only; NotImplementedError elsewhere): the stage0 model on the real corpus
(CORPUS, the `--data` spec of diffattn.corpus's token shards), bf16, compiled, CUDA graphs,
GPU_STEPS steps of 16 x 1024 tokens per arm, seeds 0 and 1: track_val_loss_delta in nats.
All runs happen once in setup_cache; the tracks only read it.
"""
import os

from . import _common as C

STEPS = 120
SEEDS = (0, 1)
PAIRED_VARIANTS = ("diff", "diff_v2")
DATA = "builtin:pydoc"
# the real corpus: override with DIFFATTN_CORPUS=<--data spec> where it lives elsewhere
CORPUS = os.environ.get("DIFFATTN_CORPUS", "corpus")
GPU_STEPS = 300


def _delta_means(r):
    s = r["summary"]
    return {"val_loss_delta": s["val_loss"]["mean"], "last_bin_loss_delta": s["loss_by_position"][-1]["mean"]}


def _measure(backend, variant):
    from diffattn import data, paired
    from diffattn.config import TrainConfig, preset

    be = C.load_backend(C.Runtime(backend), dtype="float32")
    tcfg = TrainConfig(batch_size=8, seq_len=64, steps=STEPS, warmup_steps=12, eval_every=STEPS, eval_batches=8)
    cfg = preset("tiny", attention=variant)
    return _delta_means(paired.run_paired(cfg, tcfg, data.load(DATA), be, seeds=SEEDS, progress=False))


def _measure_corpus(backend, variant, preset_name):
    from diffattn import data, paired
    from diffattn.config import TrainConfig, preset, recipe

    rt = C.Runtime(backend, need_gpu=True)
    try:
        corpus = data.load(CORPUS)
    except Exception as e:  # a machine without the corpus cannot measure this row
        raise C.Skip(f"corpus {CORPUS!r} not available here ({str(e).splitlines()[0]})") from None
    be = C.load_backend(rt, dtype="bfloat16", compile=True, graphs=True)
    r = recipe(preset_name)
    tcfg = TrainConfig(batch_size=16, seq_len=r.seq_len, steps=GPU_STEPS, lr=r.lr, warmup_steps=GPU_STEPS // 10,
                       eval_every=GPU_STEPS, eval_batches=r.eval_batches(16, r.seq_len) // 4)
    cfg = preset(preset_name, attention=variant, vocab_size=corpus.vocab_size)
    return _delta_means(paired.run_paired(cfg, tcfg, corpus, be, seeds=SEEDS, progress=False))


class Paired:
    params = (list(C.BACKENDS), list(PAIRED_VARIANTS))
    param_names = ["backend", "variant"]
    timeout = 1200
    version = "2"

    def setup_cache(self):
        return C.measure_all([(b, v) for b in C.BACKENDS for v in PAIRED_VARIANTS], _measure)

    def setup(self, cache, backend, variant):
        self.entry = C.cached_entry(cache, (backend, variant))

    def track_val_loss_delta(self, cache, backend, variant):
        return self.entry["val_loss_delta"]
    track_val_loss_delta.unit = "nats"

    def track_last_bin_loss_delta(self, cache, backend, variant):
        return self.entry["last_bin_loss_delta"]
    track_last_bin_loss_delta.unit = "nats"


class PairedCorpus:
    params = (["torch"], ["diff"], ["stage0"])
    param_names = ["backend", "variant", "preset"]
    timeout = 1800
    version = "1"

    def setup_cache(self):
        return C.measure_all([("torch", "diff", "stage0")], _measure_corpus)

    def setup(self, cache, backend, variant, preset):
        self.entry = C.cached_entry(cache, (backend, variant, preset))

    def track_val_loss_delta(self, cache, backend, variant, preset):
        return self.entry["val_loss_delta"]
    track_val_loss_delta.unit = "nats"
