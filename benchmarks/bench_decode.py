"""Decode throughput with a KV cache on the torch backend (issue 27 item 2): the stage1 twins at
batch 1 and 16, a prompt of 512 tokens then 128 greedy tokens, bf16, each layer's decode step
torch.compile'd and the whole step replayed as a CUDA graph (benchmarks/scripts/decode_table.py's
`ours`, which states what each figure measures; that script adds the bandwidth bound and HF
transformers' generate in the same run).

track_decode_tokens_per_second: B / the time of one decode step (higher is better).
track_prefill_tokens_per_second: B * 512 / the time of the prefill (higher is better).
track_decode_vs_vanilla: a DIFF variant's decode tokens/s over its vanilla twin's, same run
(higher is better; issue 27 wants >= 0.9).
Without a CUDA GPU every combination is a skip (NotImplementedError), never a number.
"""
from . import _common as C

PRESETS = ("stage1",)
BATCHES = ("1", "16")  # asv params are literal strings
PROMPT, NEW = 512, 128


def _measure(preset_name, variant, batch):
    C.Runtime("torch", need_gpu=True)
    import torch

    from benchmarks.scripts.decode_table import build, ours
    from diffattn.config import preset

    options = dict(dtype="bfloat16", kernels="auto", compile=True, graphs=True)
    device = torch.device("cuda")
    r = ours(build(preset(preset_name).twin(variant), device, options), int(batch), PROMPT, NEW, device, repeats=3)
    return {"decode": r["step_tok_s"], "prefill": r["prefill_tok_s"]}


class DecodeThroughput:
    params = (list(PRESETS), list(C.VARIANTS), list(BATCHES))
    param_names = ["preset", "variant", "batch"]
    timeout = 1200
    version = "1"

    def setup_cache(self):
        cache = C.measure_all([(p, v, b) for p in PRESETS for v in C.VARIANTS for b in BATCHES], _measure)
        for (p, v, b), entry in cache.items():
            twin = cache.get((p, "vanilla", b), {})
            if "decode" in entry and "decode" in twin:
                entry["vs_vanilla"] = entry["decode"] / twin["decode"]
        return cache

    def setup(self, cache, preset, variant, batch):
        self.entry = C.cached_entry(cache, (preset, variant, batch))

    def track_decode_tokens_per_second(self, cache, *params):
        return self.entry["decode"]
    track_decode_tokens_per_second.unit = "tokens/s"

    def track_prefill_tokens_per_second(self, cache, *params):
        return self.entry["prefill"]
    track_prefill_tokens_per_second.unit = "tokens/s"

    def track_decode_vs_vanilla(self, cache, preset, variant, batch):
        if variant == "vanilla":
            raise C.Skip("vanilla is the reference")
        return self.entry["vs_vanilla"]
    track_decode_vs_vanilla.unit = "x vanilla"
