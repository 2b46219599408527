"""Order-preserving integer keys: the ordering torch.topk uses, as plain integers.

Selecting on integer keys instead of floats makes NaN ordering, padding and ties explicit, and
it is what the Triton kernels do too (``kernels/order_key.py`` is the same map in Triton).

For a float whose bits read as the signed integer ``b`` of the same width, ``b ^ ((b >> (w-1)) &
MAX)`` orders like the float (``-0.0`` just below ``+0.0``). torch.topk treats every NaN as larger
than ``+inf``, whatever its sign bit, so NaNs are mapped to ``MAX``. For ``largest=False`` the key
is negated. Real keys then lie in ``[-MAX, MAX]``, which leaves the minimum of the key type free
as the padding key: it loses to every real element.
"""

from __future__ import annotations

import torch

_BITS_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def order_keys(x: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Integer keys with ``keys[i] > keys[j]`` exactly when torch.topk ranks ``x[i]`` before
    ``x[j]`` (ties equal, up to the sign of zero). int32 for floats up to 32 bits, else int64;
    the key type's minimum is never a real key (use it to pad)."""
    if x.dtype.is_floating_point:
        width = x.element_size() * 8
        max_key = (1 << (width - 1)) - 1
        bits = x.contiguous().view(_BITS_DTYPE[x.element_size()])
        bits = bits.to(torch.int32) if width < 32 else bits
        keys = bits ^ ((bits >> (width - 1)) & max_key)
        keys.masked_fill_(torch.isnan(x).view(keys.shape), max_key)
        return keys if largest else keys.neg_()
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"order_keys: unsupported dtype {x.dtype}")
    keys = x.to(torch.int64)
    # Bitwise not reverses the order without the overflow that negating INT64_MIN would have.
    return keys if largest else ~keys
