"""MLXBackend and MLXModel: the Backend protocol of diffattn.backend over MLX (numpy at the edges)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from backends.mlx.model import Attention, Transformer, mean_loss, token_losses
from backends.mlx.train import flat, init_opt, make_train_step
from diffattn.backend import BackendError, check_optimizer
from diffattn.config import AdamWConfig, ModelConfig, MuonConfig
from diffattn.params import ParamsError, attention_shapes, check_params

MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to_mx(tensors: dict) -> dict:
    return {k: mx.array(np.asarray(v, np.float32)) for k, v in tensors.items()}


def to_np(tensors: dict) -> dict:
    return {k: np.array(v.astype(mx.float32)) for k, v in tensors.items()}


class MLXModel:
    reduce = None  # a data-parallel model's gradient average (make_train_step's reduce)

    def __init__(self, cfg: ModelConfig, params, optim_cfg: AdamWConfig, dtype: str, kernels: str,
                 muon: MuonConfig | None = None):
        self.cfg, self.optim_cfg, self.muon = cfg, optim_cfg, muon
        self.optimizer = "adamw" if muon is None else "muon"
        self.model = Transformer(cfg, kernels, MX_DTYPES[dtype])
        self.opt = None
        self.decoder = None  # built at prefill from the current weights (decode.Decoder)
        self.load_state(params, None)

    def set_lambda_mix(self, mix: float) -> None:
        """The negative map's weight of the DIFF variants (spec.py's lambda_mix)."""
        self.model.mix["lambda_mix"] = mx.array(float(mix), mx.float32)

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
        """One optimizer update; returns the pre-update mean loss as an mx scalar (float() waits)."""
        batch = np.asarray(batch)
        micro = mx.array(batch if batch.ndim == 3 else batch[None], mx.int32)
        self.decoder = None  # its cast weights would go stale
        loss = self._step(micro, mx.array(lr, mx.float32))
        mx.async_eval(loss, self.model.parameters(), self.opt)   # the step's evaluation boundary
        return loss

    def state(self):
        mx.eval(self.model.parameters(), self.opt)
        params = to_np(flat(self.model.parameters()))
        v = to_np(self.opt["v"])  # Muon's tensors keep no v: zeros, as optim.muon_step's state
        opt = {"optimizer": self.optimizer, "step": int(self.opt["step"].item()), "m": to_np(self.opt["m"]),
               "v": {k: v[k] if k in v else np.zeros_like(p) for k, p in params.items()}}
        return params, opt

    def load_state(self, params, opt_state):
        check_params(self.cfg, params)
        self.decoder = None
        self.model.update(tree_unflatten(list(to_mx(params).items())))
        self.opt = init_opt(flat(self.model.parameters()), muon=self.muon is not None)
        if opt_state is not None:
            check_optimizer(opt_state, self.optimizer)
            self.opt["step"] = mx.array(float(opt_state["step"]), mx.float32)
            for key in ("m", "v"):
                check_params(self.cfg, opt_state[key], what=f"optimizer state {key!r}")
                self.opt[key].update(to_mx({k: a for k, a in opt_state[key].items() if k in self.opt[key]}))
        mx.eval(self.model.parameters(), self.opt)
        self._step = make_train_step(self.model, self.opt, self.optim_cfg, reduce=self.reduce,
                                     muon=self.muon)


    # ---- decoding (backends/mlx/decode.py) ---------------------------------------------------------
    def prefill(self, tokens, max_len=None):
        from diffattn import decode as spec_decode
        from backends.mlx.decode import Decoder

        tokens = np.asarray(tokens)
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if tokens.ndim != 2:
            raise BackendError(f"prefill tokens have shape {tokens.shape}, expected (B, T)")
        try:
            spec_decode.check_lengths(self.cfg, tokens.shape[0], max_len)
            spec_decode.check_tokens(self.cfg, tokens, tokens.shape[0], 0, max_len)
        except ValueError as e:
            raise BackendError(f"prefill: {e}") from None
        if self.decoder is None:
            self.decoder = Decoder(self.model)
        return np.array(self.decoder.prefill(mx.array(tokens, mx.int32), max_len))

    def decode_step(self, tokens):
        from diffattn import decode as spec_decode

        d = self.decoder
        if d is None or d.pos == 0:
            raise BackendError("decode_step before prefill (or after a train_step / load_state): prefill first")
        tokens = np.asarray(tokens).reshape(-1, 1)
        try:
            spec_decode.check_tokens(self.cfg, tokens, d.batch, d.pos, d.max_len)
        except ValueError as e:
            raise BackendError(f"decode_step: {e}") from None
        return np.array(d.step(mx.array(tokens[:, 0], mx.int32)))


class MLXBackend:
    name = "mlx"

    def __init__(self, dtype: str, kernels: str, group=None, parallel_model=None):
        self.dtype, self.kernels = dtype, kernels
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self.group = group  # an mx.distributed group under --parallel ddp (parallel.py), else None
        # the model class under a group (parallel.DataParallelModel), given by create(): parallel.py
        # subclasses this module's MLXModel, so this module does not import it back
        self.parallel_model = parallel_model
        self.parallel = "none" if group is None else "ddp"
        self.rank, self.world_size = (0, 1) if group is None else (group.rank(), group.size())
        self.is_writer = self.rank == 0  # the one process that writes run folders

    def kernels_for(self, cfg) -> str:
        """The kernels a model of cfg runs: `kernels` as asked, "auto" resolved by ops/choice.py.
        kernels="fused" for a DIFF V1 model whose head_dim / dtype the kernels' tiles cannot take
        is refused here, before any weight is built, with the reason."""
        from backends.mlx.ops import gpu_dialect

        if self.kernels == "fused" and cfg.attention == "diff" and gpu_dialect() is not None:
            from backends.mlx.ops.diff_v1 import kernel

            try:
                for name in kernel.BODIES:
                    kernel.tile_config(name, cfg.head_dim, gpu_dialect(), MX_DTYPES[self.dtype].size)
            except ValueError as e:
                raise BackendError(f"backend 'mlx': kernels='fused' cannot run this model in {self.dtype}: {e}; "
                                   "use --kernels composed") from None
        if self.kernels != "auto":
            return self.kernels
        from backends.mlx.ops.choice import auto_kernels

        return auto_kernels(cfg, self.device == "gpu" and gpu_dialect() is not None, self.dtype, gpu_dialect())

    def build(self, cfg, params, optim: AdamWConfig = AdamWConfig(), muon: MuonConfig | None = None):
        if self.group is not None:
            return self.parallel_model(self.group, cfg, params, optim, self.dtype, self.kernels_for(cfg), muon)
        return MLXModel(cfg, params, optim, self.dtype, self.kernels_for(cfg), muon)

    def attention_vjp(self, cfg, layer, params, x, grad_out):
        shapes = attention_shapes(cfg)
        for k, s in shapes.items():
            if k not in params or tuple(np.shape(params[k])) != s:
                raise ParamsError(f"attention params: tensor {k!r} missing or not of shape {s}")
        attn = Attention(cfg, layer, self.kernels_for(cfg))
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
                "dtype": self.dtype, "kernels": self.kernels, "machine": platform.machine(),
                "parallel": self.parallel, "world_size": self.world_size}
