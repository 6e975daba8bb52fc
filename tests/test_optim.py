"""The AdamW spec: closed-form first step, clipping, decay on matrices only, and agreement with
PyTorch's independent AdamW + clip_grad_norm_."""
import numpy as np
import pytest

from diffattn.config import AdamWConfig, TrainConfig
from diffattn.optim import adamw_step, global_norm, init_state, lr_at


def params_and_grads(seed=0):
    rng = np.random.default_rng(seed)
    p = {"w": rng.standard_normal((3, 4)), "norm": rng.standard_normal(4)}
    g = {"w": rng.standard_normal((3, 4)), "norm": rng.standard_normal(4)}
    return p, g


def test_first_step_is_lr_times_sign_plus_decay_on_matrices_only():
    p, g = params_and_grads()
    cfg = AdamWConfig(weight_decay=0.1, grad_clip=0.0, eps=0.0)
    new, state = adamw_step(p, g, init_state(p), lr=0.01, cfg=cfg)
    # bias-corrected first moments: m_hat / sqrt(v_hat) = g / |g|
    np.testing.assert_allclose(new["w"], p["w"] * (1 - 0.01 * 0.1) - 0.01 * np.sign(g["w"]), rtol=1e-12)
    np.testing.assert_allclose(new["norm"], p["norm"] - 0.01 * np.sign(g["norm"]), rtol=1e-12)
    assert state["step"] == 1


def test_clipping_scales_to_the_global_norm():
    p, g = params_and_grads()
    norm = global_norm(g)
    cfg = AdamWConfig(grad_clip=norm / 4, weight_decay=0.0)
    _, s_clipped = adamw_step(p, g, init_state(p), 1e-3, cfg)
    np.testing.assert_allclose(s_clipped["m"]["w"], 0.1 * g["w"] * (norm / 4) / (norm + 1e-6), rtol=1e-12)
    _, s_loose = adamw_step(p, g, init_state(p), 1e-3, AdamWConfig(grad_clip=norm * 4, weight_decay=0.0))
    np.testing.assert_allclose(s_loose["m"]["w"], 0.1 * g["w"], rtol=1e-12)


def test_matches_torch_adamw_over_ten_steps():
    torch = pytest.importorskip("torch")
    cfg = AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.5)
    p, _ = params_and_grads()
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
    opt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": cfg.weight_decay},
                             {"params": [tp["norm"]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    state = init_state(p)
    for step in range(10):
        _, g = params_and_grads(seed=100 + step)
        p, state = adamw_step(p, g, state, 1e-2 * (step + 1) / 10, cfg)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (step + 1) / 10
        for k in tp:
            tp[k].grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), cfg.grad_clip)
        opt.step()
    for k in p:  # both float64: agreement to rounding
        np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_budget_progress_drives_the_decay_instead_of_the_step():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(5, cfg, progress=0.9) == lr_at(5, cfg)  # warmup still counts steps
    assert lr_at(20, cfg, progress=0.5) == pytest.approx(0.55)
    assert lr_at(20, cfg, progress=1.7) == pytest.approx(0.1)
