"""MLXBackend and MLXModel: the Backend protocol of diffattn.backend over MLX (numpy at the edges)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from backends.mlx.model import Attention, Transformer, mean_loss, token_losses
from backends.mlx.train import flat, init_opt, make_train_step
from diffattn.config import AdamWConfig, ModelConfig
from diffattn.params import ParamsError, attention_shapes, check_params

MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to_mx(tensors: dict) -> dict:
    return {k: mx.array(np.asarray(v, np.float32)) for k, v in tensors.items()}


def to_np(tensors: dict) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in tensors.items()}


class MLXModel:
    def __init__(self, cfg: ModelConfig, params, optim_cfg: AdamWConfig, dtype: str, kernels: str):
        self.cfg, self.optim_cfg = cfg, optim_cfg
        self.model = Transformer(cfg, kernels, MX_DTYPES[dtype])
        self.opt = None
        self.load_state(params, None)

    # ---- evaluation -------------------------------------------------------------------
    def logits(self, tokens):
        out = self.model(mx.array(np.asarray(tokens), mx.int32))
        return np.array(out)

    def token_losses(self, batch):
        return np.array(token_losses(self.model, mx.array(np.asarray(batch), mx.int32)))

    def eval_loss(self, batch) -> float:
        return float(mean_loss(self.model, mx.array(np.asarray(batch), mx.int32)))

    def loss_and_grads(self, batch):
        import mlx.nn as nn

        loss, grads = nn.value_and_grad(self.model, mean_loss)(self.model, mx.array(np.asarray(batch), mx.int32))
        mx.eval(loss, grads)
        return float(loss), to_np(flat(grads))

    # ---- training -----------------------------------------------------------------------
    def train_step(self, batch, lr):
        """One AdamW update; returns the pre-update mean loss as an mx scalar (float() waits)."""
        batch = np.asarray(batch)
        micro = mx.array(batch if batch.ndim == 3 else batch[None], mx.int32)
        loss = self._step(micro, mx.array(lr, mx.float32))
        mx.async_eval(loss, self.model.parameters(), self.opt)   # the step's evaluation boundary
        return loss

    def state(self):
        mx.eval(self.model.parameters(), self.opt)
        opt = {"step": int(self.opt["step"].item()), "m": to_np(self.opt["m"]), "v": to_np(self.opt["v"])}
        return to_np(flat(self.model.parameters())), opt

    def load_state(self, params, opt_state):
        check_params(self.cfg, params)
        self.model.update(tree_unflatten(list(to_mx(params).items())))
        self.opt = init_opt(flat(self.model.parameters()))
        if opt_state is not None:
            self.opt["step"] = mx.array(float(opt_state["step"]), mx.float32)
            for key in ("m", "v"):
                check_params(self.cfg, opt_state[key], what=f"optimizer state {key!r}")
                self.opt[key].update(to_mx(opt_state[key]))
        mx.eval(self.model.parameters(), self.opt)
        self._step = make_train_step(self.model, self.opt, self.optim_cfg)


class MLXBackend:
    name = "mlx"

    def __init__(self, dtype: str, kernels: str):
        self.dtype, self.kernels = dtype, kernels
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"

    def build(self, cfg, params, optim: AdamWConfig = AdamWConfig()):
        return MLXModel(cfg, params, optim, self.dtype, self.kernels)

    def attention_vjp(self, cfg, layer, params, x, grad_out):
        shapes = attention_shapes(cfg)
        for k, s in shapes.items():
            if k not in params or tuple(np.shape(params[k])) != s:
                raise ParamsError(f"attention params: tensor {k!r} missing or not of shape {s}")
        attn = Attention(cfg, layer, self.kernels)
        dtype = MX_DTYPES[self.dtype]
        attn.update(tree_unflatten(list(to_mx({k: params[k] for k in shapes}).items())))

        def f(p, x, g):  # <out, g> differentiated is the VJP of out with cotangent g
            attn.update(p)
            out = attn(x)
            return mx.sum(out.astype(g.dtype) * g), out

        xs = mx.array(np.asarray(x, np.float32)).astype(dtype)
        g = mx.array(np.asarray(grad_out, np.float32))
        (_, out), (gp, gx) = mx.value_and_grad(f, argnums=(0, 1))(attn.trainable_parameters(), xs, g)
        return np.array(out.astype(mx.float32)), np.array(gx.astype(mx.float32)), to_np(flat(gp))

    def describe(self):
        import platform

        from backends.mlx.ops import gpu_dialect

        return {"backend": "mlx", "mlx": mx.__version__, "device": self.device, "dialect": gpu_dialect(),
                "dtype": self.dtype, "kernels": self.kernels, "machine": platform.machine()}
