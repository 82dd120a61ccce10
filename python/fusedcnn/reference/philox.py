"""Philox4x32-10 in plain PyTorch: the dropout stream of every fusedcnn backend (docs/ARCHITECTURE.md).

It reproduces Triton's ``tl.rand(seed, offset)`` bit for bit (checked against
``tl.rand`` itself in tests/test_dropout.py):

  key     (k0, k1)          = (low, high 32 bits of the 64-bit seed, two's complement)
  counter (c0, c1, c2, c3)  = (offset low 32 bits, offset >> 32, 0, 0)
  10 rounds of  c0' = hi(B*c2) ^ c1 ^ k0,  c2' = hi(A*c0) ^ c3 ^ k1,  c1' = lo(B*c2),  c3' = lo(A*c0),
                k0 += 0x9E3779B9,  k1 += 0xBB67AE85          (A = 0xD2511F53, B = 0xCD9E8D57, mod 2**32)
  u = float32(x < 0 ? ~x : x) * float32(4.6566127342e-10),  x = output word 0 read as int32

For offsets below 2**32 the counter's high word is 0, which is what tl.rand
computes for int32 and int64 offsets alike; above 2**32 it is offset >> 32, as
tl.rand does for int64 offsets in Triton 3.8 (the fusedcnn kernels build that
counter explicitly, so they do not depend on the Triton version).

The 32-bit words live in int64 tensors holding values in [0, 2**32); products
are split into 16-bit halves so that nothing overflows int64.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = []

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# 4.6566127342e-10 rounded to float32 (= 0x1.fffffep-32): the largest scale with (2**31 - 1) * scale < 1.
UNIFORM_SCALE = float.fromhex("0x1.fffffep-32")


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * b, for a constant a and words b (int64 tensors)."""
    lo16 = a * (b & 0xFFFF)                     # < 2**48
    mid = a * (b >> 16) + (lo16 >> 16)          # < 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo16 & 0xFFFF)


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a seed: its low and high 32-bit words as a 64-bit two's-complement integer.

    seed may be any int in [-2**63, 2**64): -1 and 2**64 - 1 are the same key.
    """
    if not torch.compiler.is_compiling() and not -(2**63) <= seed < 2**64:  # compiled: an int64 SymInt
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return seed & _M32, (seed >> 32) & _M32  # Python's >> and & act on the two's complement of a negative int


def philox4x32_10(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four output words of Philox4x32-10 for counters (c0, c1, c2, c3) (int64 tensors of 32-bit words)."""
    k0, k1 = seed_key(seed)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def randint(seed: int, offsets: Tensor) -> Tensor:
    """tl.randint(seed, offsets): output word 0 at counter (offset lo, offset hi, 0, 0), as an int64 in [0, 2**32)."""
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    if not torch.compiler.is_compiling() and offsets.numel() and int(offsets.min()) < 0:
        raise ValueError("offsets must be non-negative")
    zero = torch.zeros_like(offsets)
    word0, _, _, _ = philox4x32_10(seed, offsets & _M32, offsets >> 32, zero, zero)
    return word0


def uniform_from_word(word: Tensor) -> Tensor:
    """tl.rand's int -> float map: x = word as int32; u = float32(x < 0 ? ~x : x) * 4.6566127342e-10, u in [0, 1)."""
    magnitude = torch.where(word >= 2**31, word ^ _M32, word)  # ~x of a negative int32 x, in [0, 2**31)
    # magnitude < 2**31: int64 -> float32 rounds to nearest exactly as Triton's int32 -> float32 does.
    return magnitude.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def rand(seed: int, offsets: Tensor) -> Tensor:
    """tl.rand(seed, offsets): float32 uniforms in [0, 1), one per (int64, non-negative) offset."""
    return uniform_from_word(randint(seed, offsets))
