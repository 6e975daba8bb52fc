"""Configs: presets, matched twins, and one-line validation errors."""
import pytest

from diffattn.config import PRESETS, ConfigError, ModelConfig, TrainConfig, preset


@pytest.mark.parametrize("name", PRESETS)
def test_twins_share_projection_shapes(name):
    from diffattn.params import param_shapes

    diff = preset(name)
    vanilla = diff.twin("vanilla")
    assert vanilla.n_heads == 2 * diff.n_heads and vanilla.head_dim == diff.head_dim and vanilla.v_head_dim * 2 == diff.v_head_dim
    d, v = param_shapes(diff), param_shapes(vanilla)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert d[f"layers.0.attn.{proj}.weight"] == v[f"layers.0.attn.{proj}.weight"]
    assert vanilla.twin("diff") == diff
    v2 = diff.twin("diff_v2")
    assert param_shapes(v2)["layers.0.attn.q_proj.weight"][0] == 2 * vanilla.d_model
    assert v2.twin("diff") == diff


def test_preset_sizes_match_their_documentation():
    # documented in diffattn/config.py: ~30M and ~162M parameters
    assert 28e6 <= preset("stage0").num_params() <= 34e6
    assert 158e6 <= preset("stage1").num_params() <= 166e6
    assert preset("tiny").num_params() < 2e5


@pytest.mark.parametrize("kwargs,needle", [
    (dict(attention="sparse"), "attention="),
    (dict(d_model=60, n_heads=4, attention="diff"), "d_model=60"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
    (dict(n_heads=0), "n_heads=0"),
    (dict(d_model=40, n_heads=4, attention="diff"), "head_dim=5"),
    (dict(vocab_size=-1), "vocab_size=-1"),
])
def test_invalid_config_says_what_is_wrong_in_one_line(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_and_bad_override():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="invalid override"):
        preset("tiny", n_layerz=3)
    with pytest.raises(ConfigError, match="no DIFF twin"):
        ModelConfig(attention="vanilla", n_heads=3, d_model=48).twin("diff")


def test_train_config_validation():
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)
