"""Triton form of ``lowering/order_keys.py``: floats to order-preserving int32 keys, and back.

Keys are taken right after ``tl.load``: integer compares are exact and fast on the GPU, and the
Triton interpreter compares bf16 wrongly, so no kernel ever compares floats. A key other than
the NaN key gives back its value bit for bit (``value_of_key``), so selected values need not be
gathered from the input again.
"""

import triton
import triton.language as tl
from triton.language.target_info import cuda_capability_geq


@triton.jit
def order_key(v, LARGEST: tl.constexpr):
    """int32 key of fp32/fp16/bf16 ``v``: larger key = earlier in torch.topk's order, NaN first.

    16-bit inputs give keys in [-32767, 32767] and fp32 in [-(2**31 - 1), 2**31 - 1], which leaves
    the type's minimum (see ``key_pad``) free for padding.
    """
    canonical = cuda_capability_geq(8, 0)
    if v.dtype == tl.float32:
        if canonical:
            v = _canonical_nan(v)
        bits = v.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        if not canonical:
            key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, key)
    elif v.dtype == tl.float16:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32)
        key = bits ^ ((bits >> 15) & 0x7FFF)
        key = tl.where((bits & 0x7FFF) > 0x7C00, 0x7FFF, key)
    else:
        tl.static_assert(v.dtype == tl.bfloat16, "order_key: fp32, fp16 or bf16 only")
        if canonical:
            # bf16 widens to fp32 exactly (its bits, shifted); the canonical NaN's high half is
            # 0x7FFF, the 16-bit NaN key.
            bits = _canonical_nan(v.to(tl.float32)).to(tl.int32, bitcast=True) >> 16
        else:
            bits = v.to(tl.int16, bitcast=True).to(tl.int32)
        key = bits ^ ((bits >> 15) & 0x7FFF)
        if not canonical:
            key = tl.where((bits & 0x7FFF) > 0x7F80, 0x7FFF, key)
    if not LARGEST:
        key = -key
    return key


@triton.jit
def _canonical_nan(v):
    """fp32 ``v`` with every NaN, whatever its sign and payload, made 0x7FFFFFFF (PTX's
    ``max.NaN``, sm_80 and later, returns the canonical NaN); -0.0 and subnormals kept.

    One instruction an element where finding NaNs by their bits takes three (a mask, a compare,
    a select). LLVM would drop ``tl.maximum(v, -inf)`` as an identity, hence the inline PTX.
    The interpreter, which runs no PTX, and GPUs before sm_80 find NaNs by their bits."""
    return tl.inline_asm_elementwise("max.NaN.f32 $0, $1, 0fFF800000;", "=r,r", [v], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def nan_key(KEY_BITS: tl.constexpr, LARGEST: tl.constexpr):
    """The key of every NaN (``order_key`` gives all NaNs one key: their payloads are lost)."""
    key = (1 << (KEY_BITS - 1)) - 1
    if not LARGEST:
        key = -key
    return key


@triton.jit
def value_of_key(key, DTYPE: tl.constexpr, LARGEST: tl.constexpr):
    """The ``DTYPE`` value whose ``order_key`` is int32 ``key`` (exact for every key but the NaN
    key): the sign-magnitude flip of ``order_key`` undone."""
    if not LARGEST:
        key = -key
    if DTYPE == tl.float32:
        v = (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    else:
        v = (key ^ ((key >> 15) & 0x7FFF)).to(tl.int16).to(DTYPE, bitcast=True)
    return v
