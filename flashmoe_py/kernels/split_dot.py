"""An fp32 x bf16 product on the tensor cores, for the backward's router terms (kernels/token_sum.py,
kernels/router_grad.py, through fp32_dot, which takes tf32x3 for other operands on a GPU): the
fp32 operand as three bf16 parts whose sum it is (8 + 8 + 8 significant bits; exact for |a| from
2^-100 to bf16's largest finite value), each part times the bf16 operand a bf16 product, exact in
fp32; the tensor cores' fp32 accumulation rounds as theirs does (on an H200, router_grad's error
grows with the tokens one accumulator sums: 1.6e-6 of float64 over 512, 6.8e-6 over 2,048;
bench/NOTES.md item 63). Where tf32x3 would need both operands
with K contiguous (Hopper's tf32 products take no other layout; these operands have N or M
contiguous, and a transpose costs a shared-memory round trip), bf16 products take any layout.
A non-finite part (a = ±inf, or |a| past bf16's range) makes its products' rows NaN where an fp32
product would give ±inf: non-finite either way."""

import torch
import triton
import triton.language as tl


@triton.jit
def split_dot(a, b, acc, F32_DOTS: tl.constexpr):
    """a: [M, K] fp32; b: [K, N] bf16; acc: [M, N] fp32 -> acc + a @ b, the parts' products added
    smallest first. F32_DOTS: the same products as fp32 dots (Triton's interpreter computes bf16
    dots wrongly; a bf16 times a bf16 is exact in fp32 either way)."""
    hi = a.to(tl.bfloat16)
    rest = a - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    if F32_DOTS:
        bf = b.to(tl.float32)
        acc = tl.dot(lo.to(tl.float32), bf, acc, input_precision="ieee")
        acc = tl.dot(mid.to(tl.float32), bf, acc, input_precision="ieee")
        acc = tl.dot(hi.to(tl.float32), bf, acc, input_precision="ieee")
    else:
        acc = tl.dot(lo, b, acc)
        acc = tl.dot(mid, b, acc)
        acc = tl.dot(hi, b, acc)
    return acc


@triton.jit
def fp32_dot(a, b, acc, SPLIT: tl.constexpr, F32_DOTS: tl.constexpr, PRECISION: tl.constexpr):
    """a: [M, K] fp32; b: [K, N] (a float dtype); acc: [M, N] fp32 -> acc + a @ b at fp32's accuracy:
    SPLIT (b bf16) by split_dot, otherwise one fp32 dot of PRECISION (tf32x3 on a GPU's tensor
    cores, ieee in the interpreter). The constexprs are dot_modes'."""
    if SPLIT:
        return split_dot(a, b, acc, F32_DOTS)
    else:
        return tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)


def dot_modes(b_dtype: torch.dtype, on_gpu: bool) -> dict[str, bool | str]:
    """fp32_dot's constexprs for a b operand of b_dtype: split_dot for bf16; the fp32 products
    (ieee) in the Triton interpreter, which computes bf16 and tf32 dots wrongly."""
    return {"SPLIT": b_dtype == torch.bfloat16, "F32_DOTS": not on_gpu, "PRECISION": "tf32x3" if on_gpu else "ieee"}
