"""The fast decode path on a CUDA GPU: each layer's step torch.compile'd and the whole step replayed
as a CUDA graph, prefill through the fused kernels, against the float64 spec's full forward at
every position. float32 (TF32 off): bound 1e-5, as on the CPU. bfloat16 weights and cache (8 bits
of mantissa, rounding at every matmul input of two layers): bound 3e-2. Skipped without a GPU."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffattn import spec  # noqa: E402
from backends.cuda import create  # noqa: E402
from diffattn.conformance import rel_err  # noqa: E402
from diffattn.config import preset  # noqa: E402
from diffattn.params import init_params  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("attention,kv", [("vanilla", 1), ("diff", 1), ("diff_v2", 1), ("diff", None)])
def test_compiled_graph_decode_equals_the_full_forward(attention, kv, dtype, tol):
    cfg = preset("tiny", attention=attention, n_kv_heads=kv)
    params = init_params(cfg, seed=0)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 24))
    want = spec.model_logits(cfg, params, toks)
    model = create(device="cuda", dtype=dtype, kernels="auto", compile=True, graphs=True).build(cfg, params)
    for _ in range(2):  # the second prefill reuses the cache and replays the recorded graph
        got = [model.prefill(toks[:, :8], 32)] + [model.decode_step(toks[:, t])[:, None] for t in range(8, 24)]
        got = np.concatenate(got, 1)
        assert max(rel_err(got[:, t], want[:, t]) for t in range(24)) <= tol
    assert model.decoder.graph is not None
