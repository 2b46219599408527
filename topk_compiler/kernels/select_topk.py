"""Exact top-k of m candidates per row, one Triton program per row.

Candidates are (int32 order key, element index) pairs. Two strategies, picked by the cost model:

* bitonic: pack key and index into one integer and let ``tl.topk`` (a bitonic top-k network)
  produce the k largest already sorted. Cheap when k is small next to m.
* threshold: find the k-th largest key by bisection over its bits (one block-wide count per bit),
  keep keys above it plus as many ties as needed, compact them with a prefix sum and, if sorted
  output is wanted, sort only those k (through the output buffer, which doubles as scratch).

Both write int64 indices and gather the values from the input, so a NaN keeps its payload.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels.order_key import order_key

@triton.jit
def select_and_store(keys, idx, k, x_row_ptr, values_row_ptr, indices_row_ptr,
                     NS: tl.constexpr, K_POW2: tl.constexpr, KEY_BITS: tl.constexpr,
                     SORTED: tl.constexpr, THRESHOLD: tl.constexpr, SORT32: tl.constexpr):
    """Writes the k candidates with the largest keys (indices as int64, values gathered from x).

    keys: int32 [NS], padding = -2**(KEY_BITS-1); idx: [NS] element indices. Needs at least k
    real candidates. SORT32: keys are 16-bit and indices < 2**16, so a (key, index) pair packs
    into an int32 (half the cost of int64 in a sorting network).
    """
    if THRESHOLD:
        # Largest T with count(keys >= T) >= k, bit by bit on the offset-binary key.
        half = tl.full([], 1, tl.int64) << (KEY_BITS - 1)
        t_off = tl.zeros([], dtype=tl.int64)
        for i in range(KEY_BITS):
            cand_off = t_off + (tl.full([], 1, tl.int64) << (KEY_BITS - 1 - i))
            cand = (cand_off - half).to(tl.int32)
            count = tl.sum((keys >= cand).to(tl.int32), axis=0)
            t_off = tl.where(count >= k, cand_off, t_off)
        threshold = (t_off - half).to(tl.int32)
        above = keys > threshold
        tied = keys == threshold
        need = k - tl.sum(above.to(tl.int32), axis=0)
        chosen = above | tied
        if tl.sum(tied.to(tl.int32), axis=0) > need:
            # Ties at the threshold: take the first `need` of them (rare for real data).
            chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))
        pos = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        if SORTED:
            if SORT32:
                packed = ((keys << 16) | (0xFFFF - idx.to(tl.int32))).to(tl.int64)
            else:
                packed = (keys.to(tl.int64) << 32) | (0xFFFFFFFF - idx.to(tl.int64))
            tl.store(indices_row_ptr + pos, packed, mask=chosen)
            tl.debug_barrier()
            o = tl.arange(0, K_POW2)
            in_k = o < k
            packed = tl.load(indices_row_ptr + o, mask=in_k, other=-9223372036854775808)
            if SORT32:
                top = packed.to(tl.int32)
                if K_POW2 > 1:
                    top = tl.sort(top, descending=True)
                top_idx = (0xFFFF - (top & 0xFFFF)).to(tl.int64)
            else:
                top = packed
                if K_POW2 > 1:
                    top = tl.sort(top, descending=True)
                top_idx = 0xFFFFFFFF - (top & 0xFFFFFFFF)
            tl.debug_barrier()
            tl.store(indices_row_ptr + o, top_idx, mask=in_k)
            tl.store(values_row_ptr + o, tl.load(x_row_ptr + top_idx, mask=in_k), mask=in_k)
        else:
            tl.store(indices_row_ptr + pos, idx.to(tl.int64), mask=chosen)
            tl.store(values_row_ptr + pos, tl.load(x_row_ptr + idx, mask=chosen), mask=chosen)
    else:
        if SORT32:
            packed = (keys << 16) | (0xFFFF - idx.to(tl.int32))
        else:
            packed = (keys.to(tl.int64) << 32) | (0xFFFFFFFF - idx.to(tl.int64))
        if K_POW2 == 1:
            top = tl.max(packed, axis=0, keep_dims=True)
        elif K_POW2 < NS:
            top = tl.topk(packed, K_POW2)
        else:
            top = tl.sort(packed, descending=True)
        if SORT32:
            top_idx = (0xFFFF - (top & 0xFFFF)).to(tl.int64)
        else:
            top_idx = 0xFFFFFFFF - (top & 0xFFFFFFFF)
        o = tl.arange(0, K_POW2)
        in_k = o < k
        tl.store(indices_row_ptr + o, top_idx, mask=in_k)
        tl.store(values_row_ptr + o, tl.load(x_row_ptr + top_idx, mask=in_k), mask=in_k)


@triton.jit
def _select_topk_kernel(keys_ptr, idx_ptr, x_ptr, values_ptr, indices_ptr,     # pointers
                        k, m,                                                 # sizes
                        cand_row_stride, x_row_stride, out_row_stride,        # strides
                        NS: tl.constexpr, K_POW2: tl.constexpr, KEY_BITS: tl.constexpr,
                        SORTED: tl.constexpr, THRESHOLD: tl.constexpr, SORT32: tl.constexpr,
                        RAW: tl.constexpr, LARGEST: tl.constexpr):
    """One row: candidates from (keys_ptr, idx_ptr), or with RAW the whole input row itself."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, NS)
    in_m = f < m
    if RAW:
        v = tl.load(x_ptr + row * x_row_stride + f, mask=in_m, other=0.0)
        keys = tl.where(in_m, order_key(v, LARGEST), -(1 << (KEY_BITS - 1)))
        idx = f
    else:
        keys = tl.load(keys_ptr + row * cand_row_stride + f, mask=in_m, other=-(1 << (KEY_BITS - 1)))
        idx = tl.load(idx_ptr + row * cand_row_stride + f, mask=in_m, other=0)
    select_and_store(keys, idx, k, x_ptr + row * x_row_stride, values_ptr + row * out_row_stride,
                     indices_ptr + row * out_row_stride,
                     NS=NS, K_POW2=K_POW2, KEY_BITS=KEY_BITS, SORTED=SORTED, THRESHOLD=THRESHOLD,
                     SORT32=SORT32)


def _launch(keys, idx, x2d, k, m, cand_row_stride, *, key_bits, sorted, threshold, raw, largest, num_warps):
    rows = x2d.shape[0]
    values = torch.empty(rows, k, dtype=x2d.dtype, device=x2d.device)
    indices = torch.empty(rows, k, dtype=torch.int64, device=x2d.device)
    if rows:
        _select_topk_kernel[(rows,)](
            keys, idx, x2d, values, indices, k, m, cand_row_stride, x2d.stride(0), k,
            NS=triton.next_power_of_2(m), K_POW2=triton.next_power_of_2(k), KEY_BITS=key_bits,
            SORTED=sorted, THRESHOLD=threshold, SORT32=key_bits == 16 and x2d.shape[1] <= 2**16,
            RAW=raw, LARGEST=largest, num_warps=num_warps,
        )
    return values, indices


def select_topk(keys: torch.Tensor, idx: torch.Tensor, x2d: torch.Tensor, k: int, *, key_bits: int,
                sorted: bool, threshold: bool, num_warps: int = 8):
    """Top k of the candidates ``keys``/``idx`` ([rows, m] int32 each) of the rows of ``x2d``."""
    rows, m = keys.shape
    assert idx.shape == keys.shape and keys.dtype == torch.int32, "select_topk: int32 [rows, m] keys and indices"
    assert x2d.dim() == 2 and x2d.shape[0] == rows and x2d.stride(1) == 1, "select_topk: x2d must be [rows, n], unit last stride"
    assert 0 < k <= m, f"select_topk: need 0 < k <= m, got k={k}, m={m}"
    return _launch(keys, idx, x2d, k, m, keys.stride(0), key_bits=key_bits, sorted=sorted,
                   threshold=threshold, raw=False, largest=True, num_warps=num_warps)


def exact_topk(x2d: torch.Tensor, k: int, *, largest: bool, sorted: bool, threshold: bool, num_warps: int = 8):
    """Exact top-k of each row of ``x2d`` ([rows, n], unit last stride), the row held in registers."""
    assert x2d.dim() == 2 and x2d.stride(1) == 1, "exact_topk: x2d must be [rows, n], unit last stride"
    assert x2d.dtype in (torch.float32, torch.float16, torch.bfloat16), f"exact_topk: unsupported dtype {x2d.dtype}"
    assert 0 < k <= x2d.shape[1], f"exact_topk: need 0 < k <= n, got k={k}, n={x2d.shape[1]}"
    key_bits = 16 if x2d.element_size() == 2 else 32
    return _launch(x2d, x2d, x2d, k, x2d.shape[1], 0, key_bits=key_bits, sorted=sorted,
                   threshold=threshold, raw=True, largest=largest, num_warps=num_warps)
