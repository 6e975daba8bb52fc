"""The DIFF V1 kernel bodies run on the CPU: each GPU thread a std::thread, shared memory static.

kernel.py's "cpu" prelude implements the tile interface as a loop over each lane's elements,
BARRIER as a std::barrier of the program's threads and WARP_SYNC as one of its warp's 32, so a
body that reads shared memory before every writer has passed the barrier, indexes outside its
tile or leaves an output element unwritten (outputs start as NaN) fails here as on a GPU. What
it cannot check: the Metal and CUDA preludes' matrix instructions (the GPU tests do) and
bf16 / fp16 rounding (MT and T are float here). Programs run one after another.

    out, lse = forward(q, k, v, lam)            float32 numpy, layouts as in kernel.py
    dq, dk, dv, dlam = backward(q, k, v, lam, dout, lse)
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from backends.mlx.ops.diff_v1 import kernel

_LAUNCHER = """
#include <memory>
#include <thread>
#include <vector>
extern "C" void launch({params}, int gx, int gy, int gz) {{
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {{
        std::barrier<> block(NW * 32);
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        for (int w = 0; w < NW; ++w) {{
          warps.emplace_back(new std::barrier<>(32));
          cpu_emu::warps[w] = warps.back().get();
        }}
        cpu_emu::block = &block;
        std::vector<std::thread> threads;
        for (int t = 0; t < NW * 32; ++t)
          threads.emplace_back([=] {{
            cpu_emu::tid = t; cpu_emu::bx = x; cpu_emu::by = y; cpu_emu::bz = z;
            program({args});
          }});
        for (auto& th : threads) th.join();
      }}
}}
"""


def available() -> bool:
    """Whether a C++20 compiler (g++) is installed to build the emulation."""
    return shutil.which("g++") is not None


C_TYPES = {"input": "const float*", "shape": "const int*", "strides": "const long long*", "output": "float*"}


def _build(name: str, head_dim: int, nw: int, bk: int, tn: int):
    header, src = kernel.source(name, "cpu")
    params = kernel.parameters(name)
    declared = ", ".join(f"{C_TYPES[role]} {pname}" for pname, role in params)
    text = (f"#define TN {tn}\n{header}\nconstexpr int D = {head_dim}, NW = {nw}, BK = {bk};\nusing T = float;\n"
            f"static void program({declared}) {{\n{src}\n}}\n"
            + _LAUNCHER.format(params=declared, args=", ".join(pname for pname, _ in params)))
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DIFFATTN_EMULATE_CACHE", Path(tempfile.gettempdir()) / "diffattn-emulate"))
    lib = cache / f"{name}-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cpp = cache / f"{name}-{key}.cpp"
        cpp.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", str(cpp), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the {name} kernel body does not compile for the CPU emulation:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib)).launch, params


def _run(name: str, arrays: dict, outputs: dict, grid_fn, tn: int, nw: int | None, bk: int | None):
    head_dim = arrays["q"].shape[-1]
    if nw is None or bk is None:
        nw, bk = kernel.tile_config(name, head_dim, "cpu", 4, tn=tn, budget=kernel.BUDGET["cuda"])
    launch, params = _build(name, head_dim, nw, bk, tn)
    keep, args = [], []
    for pname, role in params:
        if role == "shape":
            a = np.asarray(arrays[pname.removesuffix("_shape")].shape, np.int32)
        elif role == "strides":
            src = arrays[pname.removesuffix("_strides")]
            a = np.asarray([s // src.itemsize for s in src.strides], np.int64)
        else:
            a = (outputs if role == "output" else arrays)[pname]
        keep.append(a)
        args.append(a.ctypes.data_as(ctypes.c_void_p))
    launch.argtypes = [ctypes.c_void_p] * len(args) + [ctypes.c_int] * 3
    launch(*args, *grid_fn(16 * nw))
    return outputs


def _f32(*arrays):
    # strided views stay strided (the kernels read strides); only the dtype is made float32
    return [a if a.dtype == np.float32 else a.astype(np.float32) for a in arrays]


def _nan(shape):
    return np.full(shape, np.nan, np.float32)


def forward(q, k, v, lam: float, tn: int = 16, nw: int | None = None, bk: int | None = None):
    """(out (B,L,H,2D), lse (B,L,H,2)) of the forward body on CPU threads."""
    q, k, v = _f32(q, k, v)
    B, L, H2, D = q.shape
    H = H2 // 2
    outs = _run("fwd", dict(q=q, k=k, v=v, lam=np.array([lam], np.float32)),
                dict(out=_nan((B, L, H, 2 * D)), lse=_nan((B, L, H, 2))),
                lambda rows: (-(-L // rows), H, B), tn, nw, bk)
    return outs["out"], outs["lse"]


def backward(q, k, v, lam: float, dout, lse, tn: int = 16, nw: int | None = None, bk: int | None = None):
    """(dq, dk, dv, dlam) of the dq and dkdv bodies on CPU threads; dlam = -sum(delta_2)."""
    q, k, v, dout = _f32(q, k, v, dout)
    B, L, H2, D = q.shape
    H, G2 = H2 // 2, k.shape[2]
    ins = dict(q=q, k=k, v=v, lam=np.array([lam], np.float32), dout=dout, lse=np.ascontiguousarray(lse, np.float32))
    o = _run("dq", ins, dict(dq=_nan(q.shape), delta=_nan((B, L, H, 2))), lambda rows: (-(-L // rows), H, B), tn, nw, bk)
    ins["delta"] = o["delta"]
    o2 = _run("dkdv", ins, dict(dk=_nan(k.shape), dv=_nan(v.shape)), lambda rows: (-(-L // rows), G2 // 2, B),
              tn, nw, bk)
    return o["dq"], o2["dk"], o2["dv"], -float(o["delta"][..., 1].astype(np.float64).sum())
