"""What the Triton kernels of backends/cuda/ops need from the Triton runtime, in one place.

Supported Triton (pyproject's bound states the same): 3.6 up to 3.9. The Triton kernels need
tensor descriptors (`tl.make_tensor_descriptor`, Triton >= 3.6 here); they are checked and timed on
the GPU with Triton 3.6 and run by the tests under the interpreter (TRITON_INTERPRET=1) with 3.9.
The Gluon (warp-specialized) backward kernels are written against Triton 3.6's Gluon API, which
moves between releases (3.9 renamed gl.thread_barrier to gl.barrier): on another release the
launcher takes the Triton kernels instead and says so once (gluon_available, a logged fallback).
"""
import logging

import torch
import triton

from .checks import interpreted

INTERPRETED = interpreted()  # fixed for the process at the kernels' first import, as Triton's jit is
MIN_TRITON = (3, 6)
GLUON_TRITON = "3.6."  # the release the Gluon kernels are written, checked and timed on
LOG2E = 1.4426950408889634  # the kernels take exp2 with the softmax scale folded in

log = logging.getLogger("diffattn.kernels")


def triton_version(version=None):
    return tuple(int(p) for p in (version or triton.__version__).split("+")[0].split(".")[:2])


def check_triton(version=None):
    """A clear error where this Triton is older than the kernels need."""
    if triton_version(version) < MIN_TRITON:
        raise ImportError(f"diffattn's fused kernels need Triton >= {'.'.join(map(str, MIN_TRITON))} (tensor "
                          f"descriptors), found {version or triton.__version__}: pip install 'triton>=3.6'")


_fallback_logged = set()


def gluon_available(version=None):
    """Whether this Triton runs the Gluon kernels (3.6 only). Elsewhere the Triton kernels serve
    instead, logged once a process as a warning: the fallback is stated, never silent."""
    version = version or triton.__version__
    if version.startswith(GLUON_TRITON):
        return True
    if version not in _fallback_logged:
        _fallback_logged.add(version)
        log.warning("Triton %s: the warp-specialized Gluon backward kernels are written for Triton %sx; "
                    "the Triton dK/dV and dQ kernels run instead (slower on sm_90)", version, GLUON_TRITON)
    return False


def _fix_interpreter_loop_bounds():
    """Triton 3.6's interpreter turns a scalar into a loop bound with int() of a 1-element array,
    which numpy >= 2.4 refuses; use .item() instead (interpreter only, compiled kernels untouched)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fixed_loop_bounds", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch.fixed_loop_bounds = True
    interpreter._patch_lang_tensor = patch


check_triton()
if INTERPRETED:
    _fix_interpreter_loop_bounds()


def define(name):
    """The op decorator of the kernels' torch.library ops: a triton op (torch.compile traces into it
    and Inductor launches the kernels from its generated code), or under the interpreter an opaque
    custom op, since interpreted kernels cannot be traced (they would run on fake tensors)."""
    return (torch.library.custom_op if INTERPRETED else torch.library.triton_op)(name, mutates_args=())


def unit_last_stride(t):
    """t itself when its last stride is 1 (the kernels read every other stride as given), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def tma_aligned(t):
    """Whether a tensor descriptor can address t: 16-byte aligned base, unit last stride, every
    other stride a multiple of 16 bytes. The base is read from the storage offset (CUDA's
    allocations are 256-byte aligned), which torch.compile's fake tensors have and data_ptr not."""
    return (t.storage_offset() * t.element_size() % 16 == 0 and t.stride(-1) == 1
            and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]))


def descriptor_scratch(size, alignment, stream):
    """Triton's allocator for kernels that build tensor descriptors in global scratch."""
    return torch.empty(size, dtype=torch.int8, device="cuda")
