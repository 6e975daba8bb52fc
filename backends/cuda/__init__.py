"""The PyTorch backend (`diffattn.backend.load("cuda", ...)`): model, training step, Triton kernels.

    create(device=None, dtype=None, kernels="auto", options=CudaOptions(), parallel=None)

device  None: "cuda" if a GPU is visible, else "cpu" ("gpu" is read as "cuda").
dtype   None or "float32": float32 throughout, TF32 off so float32 parity holds;
        "bfloat16": autocast bf16 with float32 master weights and optimizer state;
        "float64": for exact checks (naive and composed kernels only).
kernels "auto": per model, "fused" only where it was measured faster than composed at that shape
        (ops/choice.py), else "composed"; "naive" is the materialized softmax
        (the paper's form); "fused" needs Triton (on the CPU only under TRITON_INTERPRET=1).
options CudaOptions, this backend's own: compile (torch.compile each block's forward and
        backward), graphs (record the whole training step as a CUDA graph and replay it, CUDA only;
        train.StepGraph), kernel (the fused kernels' KernelOptions). They change speed, not the math.
parallel "ddp" | "fsdp" under torchrun (parallel.py); None: ddp when launched as several processes.
        Not a CudaOptions field: it is diffattn.backend.load's own argument, shared with mlx.

Submodules import torch; this file imports it only inside create(), so the package is cheap to
import and `ops` can be imported without loading the model.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from diffattn.backend import BackendError
from diffattn.config import AdamWConfig, ModelConfig, MuonConfig

from .ops.paired.tuning import KernelOptions

DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class CudaOptions:
    """The cuda backend's own options (diffattn.backend.load("cuda", options=...), or field by field:
    load("cuda", compile=True))."""
    compile: bool = False
    graphs: bool = False
    kernel: KernelOptions = KernelOptions()


Options = CudaOptions  # the name diffattn.backend.load looks for


class CudaBackend:
    name = "cuda"

    def __init__(self, device, dtype: str, kernels: str, options: CudaOptions,
                 parallel: str = "none", rank: int = 0, world_size: int = 1):
        self.torch_device, self.device, self.dtype, self.kernels, self.options = \
            device, device.type, dtype, kernels, options
        self.compile, self.graphs = options.compile, options.graphs
        self.parallel, self.rank, self.world_size = parallel, rank, world_size
        self.is_writer = rank == 0  # the one process that writes run folders

    def kernels_for(self, cfg: ModelConfig) -> str:
        """The kernels a model of cfg runs: `kernels` as asked, "auto" resolved by ops/choice.py."""
        if self.kernels != "auto":
            return self.kernels
        import torch

        from backends.cuda.ops.choice import auto_kernels

        cap = torch.cuda.get_device_capability(self.torch_device) if self.device == "cuda" else None
        return auto_kernels(cfg, self.device, self.dtype, self.compile, cap,
                            triton=importlib.util.find_spec("triton") is not None)

    def build(self, cfg: ModelConfig, params: dict[str, np.ndarray], optim: AdamWConfig = AdamWConfig(),
              muon: MuonConfig | None = None):
        from backends.cuda.train import CudaModel

        model = CudaModel
        if self.parallel != "none":
            from backends.cuda.parallel import MODELS

            model = MODELS[self.parallel]
        return model(cfg, params, optim, self.torch_device, self.dtype, self.kernels_for(cfg), self.compile, self.graphs,
                     muon, kernel_options=self.options.kernel)

    def attention_vjp(self, cfg: ModelConfig, layer: int, params: dict[str, np.ndarray],
                      x: np.ndarray, grad_out: np.ndarray):
        import torch

        from backends.cuda.model import build_attention, load_numpy
        from backends.cuda.train import TORCH_DTYPES

        dt = TORCH_DTYPES[self.dtype]
        attn = build_attention(cfg, layer, self.kernels_for(cfg), self.options.kernel).to(self.torch_device, dt)
        load_numpy(attn, params)
        xt = torch.tensor(np.asarray(x), dtype=dt, device=self.torch_device, requires_grad=True)
        go = torch.tensor(np.asarray(grad_out), dtype=dt, device=self.torch_device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            out = attn(xt)
        names = [n for n, _ in attn.named_parameters()]
        grads = torch.autograd.grad(out, [xt, *attn.parameters()], go.to(out.dtype))
        host = lambda t: t.detach().to("cpu", dt).numpy().copy()  # noqa: E731
        return host(out), host(grads[0]), {n: host(g) for n, g in zip(names, grads[1:])}

    def describe(self) -> dict:
        import torch

        info = {"backend": "cuda", "torch": torch.__version__, "device": self.device, "dtype": self.dtype,
                "kernels": self.kernels, "compile": self.compile, "graphs": self.graphs,
                "parallel": self.parallel, "world_size": self.world_size}
        if self.options.kernel != KernelOptions():
            info["kernel_options"] = self.options.kernel.text() or repr(self.options.kernel)
        if self.device == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.torch_device)
            info["cuda"] = torch.version.cuda
        if importlib.util.find_spec("triton") is not None:
            import triton

            info["triton"] = triton.__version__
        return info


def create(device=None, dtype=None, kernels="auto", options: CudaOptions | None = None, parallel=None,
           **fields) -> CudaBackend:
    """fields: CudaOptions' fields by name (create(compile=True)), over options."""
    import torch

    from backends.cuda import parallel as par

    try:
        options = dataclasses.replace(options or CudaOptions(), **fields)
    except TypeError:
        raise BackendError(f"backend 'cuda' has no option(s) {sorted(set(fields) - set(CudaOptions.__annotations__))}, "
                           f"expected {tuple(CudaOptions.__annotations__)}") from None
    if not isinstance(options.kernel, KernelOptions):
        raise BackendError(f"backend 'cuda': options.kernel must be a KernelOptions, got {type(options.kernel).__name__}")
    compile, graphs = bool(options.compile), bool(options.graphs)
    parallel = par.resolve(parallel)

    if device == "gpu":
        device = "cuda"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackendError(f"backend 'cuda': unknown device {device!r}, expected 'cpu' or 'cuda'") from None
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"backend 'cuda' runs on 'cpu' or 'cuda', not device={device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"backend 'cuda': device {device!r} requested but PyTorch {torch.__version__} "
                           f"sees no CUDA GPU (use --device cpu)")
    if graphs and parallel != "none":
        raise BackendError(f"backend 'cuda': graphs=True records one process's step; it does not capture "
                           f"{parallel}'s collectives: drop --cuda-graphs or --parallel")
    if graphs and dev.type != "cuda":
        raise BackendError(f"backend 'cuda': graphs=True records CUDA graphs, which need device='cuda', not {device!r}")
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise BackendError(f"backend 'cuda' computes in {' / '.join(DTYPES)}, not {dtype!r} "
                           f"(float16 would need loss scaling, which is not implemented)")
    if kernels == "auto" and dev.type == "cpu":  # on a GPU, resolved per model (kernels_for)
        kernels = "composed"
    if kernels not in ("auto", "naive", "composed", "fused"):
        raise BackendError(f"backend 'cuda': unknown kernels {kernels!r}, expected auto, naive, composed or fused")
    if kernels == "fused":
        if importlib.util.find_spec("triton") is None:
            raise BackendError("backend 'cuda': kernels='fused' needs Triton, which is not installed "
                               "(pip install 'diffattn[cuda]', or use kernels='composed')")
        if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("backend 'cuda': kernels='fused' on the CPU runs only under the Triton "
                               "interpreter (set TRITON_INTERPRET=1), or use kernels='composed'")
        if dtype == "float64":
            raise BackendError("backend 'cuda': kernels='fused' has no float64 path, use float32 or bfloat16")
    if dtype in ("float32", "float64"):  # IEEE float32 matmuls: no TF32, so float32 parity holds
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rank, world = 0, 1
    if parallel != "none":
        if dev.index is not None:
            raise BackendError(f"backend 'cuda': with --parallel each rank takes cuda:LOCAL_RANK; give --device "
                               f"{dev.type}, not {device!r}")
        rank, world, rank_device = par.init(dev.type)
        dev = rank_device or dev
    return CudaBackend(dev, dtype, kernels, dataclasses.replace(options, compile=compile, graphs=graphs),
                       parallel, rank, world)
