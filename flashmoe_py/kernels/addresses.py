"""Tensors that kernels find through address words in device memory, not through their launch
arguments: a CUDA graph bakes each kernel's arguments, so a graph replayed on a caller's new input
(and into a new output) would otherwise need them copied into and out of the tensors it was
captured with. The layer's captured forward (backends/flash.py's CapturedForward) keeps one
int64 word per such tensor, written before each replay (write_addresses, outside the graph); its
kernels take the tensor it was captured with as the argument, for the dtype and alignment, and
move to the address the word holds (rebase)."""

import torch
import triton
import triton.language as tl

ALIGN = 16  # bytes: what Triton assumes of a tensor argument's address, and rebase keeps
_ALIGN = tl.constexpr(ALIGN)  # the same, as a jit function may read a global


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself where the kernels can read it through its address (contiguous, at an ALIGN-byte
    aligned address), else a contiguous copy (a strided view, or one at an odd offset)."""
    if x.is_contiguous() and x.data_ptr() % ALIGN == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def check_words(name: str, words: torch.Tensor, count: int, device: torch.device) -> None:
    """Raise a ValueError naming `name` unless words holds at least `count` int64 words, one
    dimension, on `device` (the kernels read words[0 .. count - 1])."""
    if words.dtype != torch.int64 or words.dim() != 1 or words.numel() < count or words.device != device:
        raise ValueError(f"{name}: expected at least {count} int64 word(s) in one dimension on {device}, got "
                         f"{words.dtype} {tuple(words.shape)} on {words.device}")


def write_addresses(words: torch.Tensor, *tensors: torch.Tensor) -> None:
    """words[i] := tensors[i]'s address, on the current stream (a kernel each, ordered before the
    kernels that read the words). words: [len(tensors)] int64 on the tensors' device; each tensor
    ALIGN-byte aligned, as Triton takes its tensor arguments (unaligned: a ValueError)."""
    for i, t in enumerate(tensors):
        if t.data_ptr() % ALIGN:
            raise ValueError(f"a tensor at address {t.data_ptr():#x}: kernels read it {ALIGN}-byte aligned")
        words[i].fill_(t.data_ptr())


@triton.jit
def rebase(ptr, word, AT: tl.constexpr):
    """ptr, or with AT the tensor of ptr's dtype whose address the int64 at `word` holds: ptr moved
    by the distance in whole elements, hinted a multiple of ALIGN bytes (write_addresses checks
    it), so the kernel's loads and stores through it stay as wide as through ptr."""
    if AT:
        ELT: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
        ptr = ptr + tl.multiple_of((tl.load(word) - ptr.to(tl.int64)) // ELT, _ALIGN // ELT)
    return ptr
