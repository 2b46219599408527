"""Order-preserving integer keys: the ordering torch.topk uses, as plain integers.

Selecting on integer keys instead of floats makes NaN ordering, padding and ties explicit, and
it is what the Triton kernels do too (``kernels/order_key.py`` is the same map in Triton).

For a float whose bits read as the signed integer ``b`` of the same width, ``b ^ ((b >> (w-1)) &
MAX)`` orders like the float (``-0.0`` just below ``+0.0``). torch.topk treats every NaN as larger
than ``+inf``, whatever its sign bit, so NaNs are first mapped to ``MAX``. For ``largest=False``
the key is negated. Real keys then lie in ``[-MAX, MAX]``, which leaves the minimum of the key type
free as the padding key: it loses to every real element.
"""

from __future__ import annotations

import torch

_BITS_DTYPE = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# The key of padding slots: strictly below every real key.
PAD_KEY = torch.iinfo(torch.int64).min


def order_keys(x: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """int64 keys with ``keys[i] > keys[j]`` exactly when torch.topk ranks ``x[i]`` before ``x[j]``
    (ties equal, up to the sign of zero)."""
    if x.dtype.is_floating_point:
        bits_dtype = _BITS_DTYPE[x.element_size()]
        width = x.element_size() * 8
        max_key = (1 << (width - 1)) - 1
        bits = x.contiguous().view(bits_dtype).to(torch.int64)
        keys = bits ^ ((bits >> (width - 1)) & max_key)
        keys = torch.where(torch.isnan(x), torch.full_like(keys, max_key), keys)
        return keys if largest else -keys
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"order_keys: unsupported dtype {x.dtype}")
    keys = x.to(torch.int64)
    # Bitwise not reverses the order without the overflow that negating INT64_MIN would have.
    return keys if largest else ~keys
