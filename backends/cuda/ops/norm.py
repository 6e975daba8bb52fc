"""RMSNorm as every path computes it: in float32 (or float64) whatever the input's dtype."""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32 (or float64), returned in x's dtype."""
    xf = x.to(weight.dtype) if x.dtype in (torch.float16, torch.bfloat16) else x
    return F.rms_norm(xf, xf.shape[-1:], weight, eps).to(x.dtype)
