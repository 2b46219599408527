"""Gather-matmul: ``out[m, s] = act(x[m] . w[slots[s]] + bias[slots[s]])`` for a list of row
indices ``slots`` of ``w``, reading only those rows (no dense copy of ``w``, no gathered copy).

One program owns ``BLOCK_S`` slots and ``BLOCK_M`` rows of ``x`` and walks the shared dimension in
``BLOCK_K`` steps; every row of ``w`` it reads is contiguous, so loads are coalesced. A slot of
-1 is padding (its row is not read). With a ``member`` mask a row of ``x`` keeps only its own
candidates; every other entry, and every padding slot, is ``fill``. ``gather_dot`` is shared
with the sparse FFN kernel.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import cdiv, next_pow2
# Activations the epilogue applies (constexpr codes).
ACTIVATIONS = {"none": 0, "relu": 1, "relu_squared": 2, "gelu": 3}


# (BLOCK_S, BLOCK_K, num_warps, num_stages) tried by the autotuner. Every one compiles for sm_90a
# without register spills at its BLOCK_M (ptxas -v; the gathered rows' 64-bit addresses are what
# fills the registers). GEMV (one row of x): few slots per program, so that a 512-candidate row
# spreads over >= 64 SMs. Tensor cores (16-64 rows of x): spill-free for BLOCK_M up to 64.
GEMV_CONFIGS = ((4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (16, 256, 4, 3), (8, 1024, 8, 3))
MMA_CONFIGS = ((16, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 4))


def _configs(table):
    return [triton.Config({"BLOCK_S": bs, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bs, bk, w, st in table]


@triton.jit
def gather_dot(x_ptr, w_ptr, slots, m, M, K, x_row_stride, w_row_stride,
               BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_S] fp32: ``x[m] . w[slot]`` (0 where the slot is -1 or m >= M).

    BLOCK_M == 1 reduces in registers (a GEMV: no tensor-core tile to fill); otherwise tl.dot.
    """
    valid = slots >= 0
    w_rows = w_ptr + tl.where(valid, slots, 0).to(tl.int64) * w_row_stride
    x_rows = x_ptr + m.to(tl.int64) * x_row_stride
    in_m = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < K
        w = tl.load(w_rows[:, None] + k[None, :], mask=valid[:, None] & in_k[None, :], other=0.0)
        xt = tl.load(x_rows[:, None] + k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * xt.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def activate(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        h = tl.maximum(h, 0.0)
    elif ACTIVATION == 2:
        h = tl.maximum(h, 0.0)
        h = h * h
    elif ACTIVATION == 3:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    return h


@triton.jit
def _gather_matmul_kernel(x_ptr, w_ptr, slots_ptr, bias_ptr, member_ptr, out_ptr,   # pointers
                          M, S, K, fill,                                            # sizes, fill value
                          x_row_stride, w_row_stride, member_row_stride, out_row_stride,  # strides
                          HAS_BIAS: tl.constexpr, HAS_MEMBER: tl.constexpr, ACTIVATION: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_s = s < S
    slots = tl.load(slots_ptr + s, mask=in_s, other=-1)
    acc = gather_dot(x_ptr, w_ptr, slots, m, M, K, x_row_stride, w_row_stride,
                     BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S, BLOCK_K=BLOCK_K, PRECISION=PRECISION)
    valid = slots >= 0
    if HAS_BIAS:
        b = tl.load(bias_ptr + tl.where(valid, slots, 0), mask=valid, other=0.0)
        acc += b.to(tl.float32)[None, :]
    acc = activate(acc, ACTIVATION)
    out_mask = (m < M)[:, None] & in_s[None, :]
    keep = valid[None, :]
    if HAS_MEMBER:
        member = tl.load(member_ptr + m.to(tl.int64)[:, None] * member_row_stride + s[None, :], mask=out_mask, other=0)
        keep = keep & (member != 0)
    acc = tl.where(keep, acc, fill)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * out_row_stride + s[None, :], acc, mask=out_mask)


_gather_gemv_tuned = triton.autotune(configs=_configs(GEMV_CONFIGS), key=["M", "S", "K"])(_gather_matmul_kernel)
_gather_mma_tuned = triton.autotune(configs=_configs(MMA_CONFIGS), key=["M", "S", "K"])(_gather_matmul_kernel)


def block_m(rows: int) -> int:
    """Rows of x per program: 1 (GEMV) for one row, else a tensor-core tile of 16..64 rows."""
    return 1 if rows == 1 else min(64, max(16, next_pow2(rows)))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 weights must give fp32 results (the values HiRE returns are the exact logits), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def gather_matmul(x2d: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None = None, *,
                  member: torch.Tensor | None = None, activation: str = "none", fill: float = 0.0) -> torch.Tensor:
    """[rows, S] fp32 ``act(x2d @ w[slots].T + bias[slots])``; ``fill`` at padding slots (-1) and
    where ``member`` ([rows, S] bool) is False."""
    rows, k = x2d.shape
    assert w.dim() == 2 and w.shape[1] == k and w.stride(1) == 1, \
        f"gather_matmul: w must be [n, {k}] with unit last stride"
    assert x2d.stride(1) == 1 and x2d.dtype == w.dtype, "gather_matmul: x2d must have unit last stride and w's dtype"
    assert slots.dim() == 1 and slots.dtype == torch.int64, "gather_matmul: slots must be 1-D int64"
    assert member is None or (member.shape == (rows, slots.shape[0]) and member.dtype == torch.bool), \
        "gather_matmul: member must be a [rows, S] bool mask"
    s = slots.shape[0]
    out = torch.empty(rows, s, dtype=torch.float32, device=x2d.device)
    if rows == 0 or s == 0:
        return out
    bm = block_m(rows)
    member_arg = member.view(torch.uint8) if member is not None else slots
    args = (x2d, w, slots, bias if bias is not None else slots, member_arg, out, rows, s, k, fill,
            x2d.stride(0), w.stride(0), member_arg.stride(0) if member is not None else 0, out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, HAS_MEMBER=member is not None, ACTIVATION=ACTIVATIONS[activation],
                PRECISION=dot_precision(w.dtype), BLOCK_M=bm)
    if x2d.is_cuda:
        def grid(META):
            return cdiv(s, META["BLOCK_S"]), cdiv(rows, bm)

        (_gather_gemv_tuned if bm == 1 else _gather_mma_tuned)[grid](*args, **meta)
    else:  # the interpreter: one fixed, small configuration
        _gather_matmul_kernel[(cdiv(s, 16), cdiv(rows, bm))](*args, **meta, BLOCK_S=16, BLOCK_K=32)
    return out
