"""Quantized scores: ``out[m, j] = scale[j] * (x[m] . q[j]) + bias[j]`` for a per-row quantized
weight ``q``, int8 ([n, d]) or int4 packed two per byte ([n, ceil(d / 2)], even column in the low
nibble). This is the HiRE int8 / int4 predictor: it reads 1 or 1/2 byte per weight.

One program owns ``BLOCK_N`` rows of ``q`` and ``BLOCK_M`` rows of ``x``. The quantized values
are widened to x's dtype in registers (integers up to 127 are exact in bf16/fp16) and multiplied
on tensor cores, or, for one row of x, reduced in fp32. For int4 the even and odd columns of x
are loaded separately and meet the low and high nibbles, so nothing is interleaved.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import cdiv
from topk_compiler.kernels.gather_matmul import block_m, dot_precision

# (BLOCK_N, BLOCK_K, num_warps, num_stages) tried by the autotuner (ptxas -v on sm_90a: no spills).
GEMV_CONFIGS = ((16, 512, 4, 3), (32, 256, 4, 3), (64, 256, 8, 3), (32, 512, 8, 4))
MMA_CONFIGS = ((128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4))


def _configs(table):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in table]


@triton.jit
def _quantized_scores_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr,      # pointers
                             M, N, K,                                        # sizes
                             x_row_stride, q_row_stride, out_row_stride,     # strides
                             BITS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_j = j < N
    in_m = m < M
    q_rows = q_ptr + j.to(tl.int64) * q_row_stride
    x_rows = x_ptr + m.to(tl.int64) * x_row_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if BITS == 8:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < K
            q = tl.load(q_rows[:, None] + k[None, :], mask=in_j[:, None] & in_k[None, :], other=0)
            xt = tl.load(x_rows[:, None] + k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(q.to(tl.float32) * xt.to(tl.float32), axis=1)[None, :]
            else:
                acc = tl.dot(xt, tl.trans(q.to(xt.dtype)), acc, input_precision=PRECISION)
    else:
        for k0 in range(0, K, 2 * BLOCK_K):
            c = k0 // 2 + tl.arange(0, BLOCK_K)            # packed byte columns
            even = 2 * c
            in_c = even < K
            packed = tl.load(q_rows[:, None] + c[None, :], mask=in_j[:, None] & in_c[None, :], other=0).to(tl.int32)
            lo = ((packed & 0xF) ^ 8) - 8
            hi = ((packed >> 4) ^ 8) - 8
            x_even = tl.load(x_rows[:, None] + even[None, :], mask=in_m[:, None] & in_c[None, :], other=0.0)
            x_odd = tl.load(x_rows[:, None] + even[None, :] + 1,
                            mask=in_m[:, None] & (even + 1 < K)[None, :], other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(lo.to(tl.float32) * x_even.to(tl.float32) + hi.to(tl.float32) * x_odd.to(tl.float32),
                              axis=1)[None, :]
            else:
                acc = tl.dot(x_even, tl.trans(lo.to(x_even.dtype)), acc, input_precision=PRECISION)
                acc = tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)), acc, input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + j, mask=in_j, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + j, mask=in_j, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m.to(tl.int64)[:, None] * out_row_stride + j[None, :], acc,
             mask=in_m[:, None] & in_j[None, :])


_scores_gemv_tuned = triton.autotune(configs=_configs(GEMV_CONFIGS), key=["M", "N", "K"])(_quantized_scores_kernel)
_scores_mma_tuned = triton.autotune(configs=_configs(MMA_CONFIGS), key=["M", "N", "K"])(_quantized_scores_kernel)


def quantized_scores(x2d: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                     bits: int, in_features: int) -> torch.Tensor:
    """[rows, n] fp32 ``(x2d @ dequantized(q).T) + bias``."""
    rows, k = x2d.shape
    assert bits in (8, 4), f"quantized_scores: bits must be 8 or 4, got {bits}"
    assert k == in_features and q.shape[1] == (k if bits == 8 else (k + 1) // 2), \
        f"quantized_scores: q {tuple(q.shape)} does not hold {bits}-bit rows of length {k}"
    assert x2d.stride(1) == 1 and q.stride(1) == 1, "quantized_scores: unit last strides"
    assert scale.dtype == torch.float32 and scale.shape == (q.shape[0],), "quantized_scores: fp32 scale per row"
    n = q.shape[0]
    out = torch.empty(rows, n, dtype=torch.float32, device=x2d.device)
    if rows == 0 or n == 0:
        return out
    bm = block_m(rows)
    args = (x2d, q, scale, bias if bias is not None else scale, out, rows, n, k, x2d.stride(0), q.stride(0),
            out.stride(0))
    meta = dict(BITS=bits, HAS_BIAS=bias is not None, PRECISION=dot_precision(x2d.dtype), BLOCK_M=bm)
    if x2d.is_cuda:
        def grid(META):
            return cdiv(n, META["BLOCK_N"]), cdiv(rows, bm)

        (_scores_gemv_tuned if bm == 1 else _scores_mma_tuned)[grid](*args, **meta)
    else:  # the interpreter: one fixed, small configuration
        _quantized_scores_kernel[(cdiv(n, 16), cdiv(rows, bm))](*args, **meta, BLOCK_N=16, BLOCK_K=16)
    return out
