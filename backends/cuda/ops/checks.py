"""Argument checks shared by every implementation: one-line errors, and the head grouping."""
import os

IMPLS = ("naive", "composed", "fused")


def interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (on the CPU), as the environment says
    now. The kernels' modules read it once, when they are first imported (triton_runtime), since
    Triton decides it at @triton.jit time; reading it at this module's import instead would fix
    it before a caller (a test module, a script) has set TRITON_INTERPRET."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_impl(impl, q):
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "fused" and not q.is_cuda and not interpreted():
        raise ValueError("impl 'fused' needs a CUDA tensor (or TRITON_INTERPRET=1 for the Triton interpreter on CPU)")


def _shape_error(what, **shapes):
    got = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
    return ValueError(f"{what}: got {got}")


def vanilla_heads(q, k, v):
    """Returns (B, L, H, G, d) after checking q (B,L,H,d), k, v (B,L,G,d)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise _shape_error("vanilla attention wants q (B,L,H,d), k and v (B,L,G,d)", q=q.shape, k=k.shape, v=v.shape)
    B, L, H, d = q.shape
    G = k.shape[2]
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({G})")
    return B, L, H, G, d


def diff_v1_heads(q, k, v, lam):
    """Returns (B, L, H, G, d) after checking q (B,L,2H,d), k (B,L,2G,d), v (B,L,G,2d) (or (B,L,G,d):
    diff_heads="double"), lam 0-dim."""
    ok = q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
    ok = ok and q.shape[2] % 2 == 0 and k.shape[2] == 2 * v.shape[2] and q.shape[3] == k.shape[3]
    ok = ok and v.shape[3] in (q.shape[3], 2 * q.shape[3])  # split (paper) layout, or diff_heads="double"
    if not ok:
        raise _shape_error("DIFF V1 attention wants q (B,L,2H,d), k (B,L,2G,d), v (B,L,G,2d)", q=q.shape, k=k.shape, v=v.shape)
    if lam.dim() != 0:
        raise ValueError(f"DIFF V1 lambda must be a 0-dim tensor, got shape {tuple(lam.shape)}")
    B, L, H2, d = q.shape
    H, G = H2 // 2, v.shape[2]
    if H % G:
        raise ValueError(f"DIFF heads ({H}) must be a multiple of kv heads ({G})")
    return B, L, H, G, d


def diff_v2_heads(q, k, v, lam):
    """Returns (B, L, H, G, d) after checking q (B,L,2H,d), k, v (B,L,G,d), lam (B,L,H)."""
    ok = q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2]
    ok = ok and q.shape[2] % 2 == 0 and q.shape[3] == k.shape[3]
    if not ok:
        raise _shape_error("DIFF V2 attention wants q (B,L,2H,d), k and v (B,L,G,d)", q=q.shape, k=k.shape, v=v.shape)
    B, L, H2, d = q.shape
    H, G = H2 // 2, k.shape[2]
    if tuple(lam.shape) != (B, L, H):
        raise ValueError(f"DIFF V2 lambda must have shape (B, L, H) = {(B, L, H)}, got {tuple(lam.shape)}")
    if H % G:  # so both query heads of a pair read the same kv head
        raise ValueError(f"output heads ({H}) must be a multiple of kv heads ({G})")
    return B, L, H, G, d


FUSED_DTYPES = ("float32", "bfloat16", "float16")


def fused_inputs(q, k, v):
    """What the Triton kernels take: one 16/32-bit dtype and device for q, k, v; an even head_dim up
    to 128 (other widths than 16/32/64/128 run zero-padded to the next one, see paired/op.py)."""
    if not (q.dtype == k.dtype == v.dtype) or str(q.dtype).replace("torch.", "") not in FUSED_DTYPES:
        raise ValueError(f"impl 'fused' wants q, k, v of one dtype among {', '.join(FUSED_DTYPES)}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if d % 2 or not 2 <= d <= 128:
        raise ValueError(f"impl 'fused' supports an even head_dim up to 128, got {d}")


def check_norm(norm, v):
    """norm = (weight, eps) for DIFF V1's output rows, 2d = v's head dim wide."""
    weight, eps = norm
    if weight.shape != (v.shape[-1],) or not eps > 0:
        raise ValueError(f"norm wants (weight of shape ({v.shape[-1]},), eps > 0), got weight "
                         f"{tuple(weight.shape)}, eps {eps}")
