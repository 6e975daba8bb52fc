"""Which CUDA SDPA backends compute grouped-query attention (enable_gqa) correctly in bf16 on the
layouts DIFF V2's composed path feeds them? Error of each backend against float32 math on
explicitly repeated k/v.   PYTHONPATH=. python benchmarks/scripts/sdpa_gqa_probe.py   (needs a CUDA GPU)"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffattn.numerics import rel_error as rel



def main():
    torch.manual_seed(0)
    print(f"{'case':34s} {'backend':10s} {'contiguous':>10s} {'rel.err':>9s}")
    for B, L, Hq, G, d in [(2, 10, 6, 3, 16), (2, 77, 8, 2, 64), (1, 45, 8, 2, 32), (2, 128, 16, 4, 64)]:
        x = torch.randn(B, L, (Hq + 2 * G) * d, device="cuda")
        q = x[..., :Hq * d].view(B, L, Hq, d).transpose(1, 2)
        k = x[..., Hq * d:(Hq + G) * d].view(B, L, G, d).transpose(1, 2)
        v = x[..., (Hq + G) * d:].view(B, L, G, d).transpose(1, 2)
        rep = Hq // G
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            for contiguous in (False, True):
                qb, kb, vb = (t.bfloat16() for t in (q, k, v))
                if contiguous:
                    qb, kb, vb = (t.contiguous() for t in (qb, kb, vb))
                try:
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
                    err = f"{rel(out, ref):9.2e}"
                except RuntimeError:
                    err = "refused"
                print(f"B{B} L{L} Hq{Hq} G{G} d{d}".ljust(34), f"{backend.name[:10]:10s} {str(contiguous):>10s} {err:>9s}")
        out = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True, enable_gqa=True)
        print(f"B{B} L{L} Hq{Hq} G{G} d{d}".ljust(34), f"{'default':10s} {'False':>10s} {rel(out, ref):9.2e}")


if __name__ == "__main__":
    main()
