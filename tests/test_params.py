"""Canonical parameters: paired init and safetensors I/O with clear errors."""
import numpy as np
import pytest

from diffattn.config import preset
from diffattn.params import (ParamsError, init_params, load_params, load_tensors, param_shapes, save_params,
                             shared_names)


def test_init_matches_the_canonical_shapes():
    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    assert {k: v.shape for k, v in params.items()} == param_shapes(cfg)
    assert all(v.dtype == np.float32 for v in params.values())


@pytest.mark.parametrize("variant", ["diff", "diff_v2"])
def test_paired_init_shares_every_common_tensor_byte_for_byte(variant, tmp_path):
    vanilla_cfg = preset("tiny", attention="vanilla")
    other_cfg = vanilla_cfg.twin(variant)
    a, b = init_params(vanilla_cfg, seed=7), init_params(other_cfg, seed=7)
    shared = shared_names(a, b)
    # diff shares every tensor but its lambdas/subln; diff_v2 all but q_proj and lambda_proj
    only_other = set(b) - set(shared)
    expected = {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight"} if variant == "diff" \
        else {"q_proj.weight", "lambda_proj.weight"}
    assert {n.split(".attn.")[1] for n in only_other} == expected
    save_params(tmp_path / "b.safetensors", other_cfg, b)
    b = load_params(tmp_path / "b.safetensors", other_cfg)
    for n in shared:
        assert a[n].tobytes() == b[n].tobytes(), n


def test_seeds_and_names_give_distinct_draws():
    cfg = preset("tiny")
    a, b = init_params(cfg, seed=0), init_params(cfg, seed=1)
    assert not np.array_equal(a["layers.0.attn.q_proj.weight"], b["layers.0.attn.q_proj.weight"])
    assert not np.array_equal(a["layers.0.attn.q_proj.weight"][:4, :4], a["layers.0.attn.k_proj.weight"][:4, :4])
    assert not np.array_equal(a["layers.0.attn.lambda_q1"], a["layers.0.attn.lambda_k1"])


def test_round_trip_is_exact(tmp_path):
    cfg = preset("tiny", attention="diff_v2")
    params = init_params(cfg, seed=3)
    save_params(tmp_path / "p.safetensors", cfg, params, {"step": 5})
    back = load_params(tmp_path / "p.safetensors", cfg)
    assert all(np.array_equal(params[k], back[k]) for k in params)
    _, meta = load_tensors(tmp_path / "p.safetensors")
    assert meta["step"] == "5" and "d_model" in meta["model_config"]


def test_corrupt_file_is_one_clear_line(tmp_path):
    cfg = preset("tiny")
    path = tmp_path / "p.safetensors"
    save_params(path, cfg, init_params(cfg))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ParamsError) as e:
        load_params(path, cfg)
    assert "p.safetensors" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "missing.safetensors", cfg)


def test_mismatched_file_names_the_offending_tensor(tmp_path):
    small, other = preset("tiny"), preset("tiny", d_model=128)
    path = tmp_path / "p.safetensors"
    save_params(path, small, init_params(small))
    with pytest.raises(ParamsError, match="'embed.weight' has shape"):
        load_params(path, other)
    with pytest.raises(ParamsError, match="missing tensor 'layers.0.attn.q_proj.weight'"):
        params = init_params(small)
        del params["layers.0.attn.q_proj.weight"]
        save_params(path, small, params)
    with pytest.raises(ParamsError, match="unexpected tensor"):
        load_params(path, small.twin("vanilla"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_file_the_umasks_permissions(tmp_path, umask, mode):
    """As open() would: 0666 less the umask (mkstemp's 0600 belongs to the temporary only)."""
    import os
    import stat

    from diffattn.params import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_a_safetensors_file_is_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders the metadata map by a per-process hash; save_tensors sorts it, so a
    resumed run's checkpoint can be byte-identical to the uninterrupted run's. Six processes
    with three metadata keys would all agree by chance with probability about (1/6)^5."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from diffattn.params import save_tensors; "
            "save_tensors(sys.argv[1], {'a': np.arange(5, dtype=np.float32), 'b': np.ones((2, 3))}, "
            "{'step': '8', 'optimizer': 'adamw', 'note': {'q': 'x'}})")
    files = [tmp_path / f"p{i}.safetensors" for i in range(6)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    _, meta = load_tensors(files[0])
    assert meta == {"note": '{"q": "x"}', "optimizer": "adamw", "step": "8"}
