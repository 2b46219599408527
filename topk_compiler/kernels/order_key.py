"""Triton form of ``lowering/order_keys.py``: floats to order-preserving int32 keys.

Keys are taken right after ``tl.load``: integer compares are exact and fast on the GPU, and the
Triton interpreter compares bf16 wrongly, so no kernel ever compares floats.
"""

import triton
import triton.language as tl


@triton.jit
def order_key(v, LARGEST: tl.constexpr):
    """int32 key of fp32/fp16/bf16 ``v``: larger key = earlier in torch.topk's order, NaN first.

    16-bit inputs give keys in [-32767, 32767] and fp32 in [-(2**31 - 1), 2**31 - 1], which leaves
    the type's minimum (see ``key_pad``) free for padding.
    """
    if v.dtype == tl.float32:
        bits = v.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, key)
    elif v.dtype == tl.float16:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32)
        key = bits ^ ((bits >> 15) & 0x7FFF)
        key = tl.where((bits & 0x7FFF) > 0x7C00, 0x7FFF, key)
    else:
        tl.static_assert(v.dtype == tl.bfloat16, "order_key: fp32, fp16 or bf16 only")
        bits = v.to(tl.int16, bitcast=True).to(tl.int32)
        key = bits ^ ((bits >> 15) & 0x7FFF)
        key = tl.where((bits & 0x7FFF) > 0x7F80, 0x7FFF, key)
    if not LARGEST:
        key = -key
    return key
