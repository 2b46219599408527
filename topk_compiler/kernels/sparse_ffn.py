"""Sparse FFN: ``out[m] = sum_{j: pred[m, j] > t} act(x[m] . W1[j] + b1[j]) W2T[j] + b2``, reading
only the chosen neurons' rows of ``W1`` ([d_ff, d]) and of ``W2T`` ([d_ff, d_out], the transposed
output weight, so that a neuron's outgoing weights are one contiguous row).

Three launches, none waiting on the host:

1. ``_select_neurons_kernel`` (a program per 1024 neurons, each counting the chosen ones before
   its block itself): the neurons that some row predicts above the threshold ``t``, compacted in
   order into ``slots``, and their number into ``count``. With several rows,
   ``_any_above_kernel`` first reduces the rows to one mask, over many programs.
2. ``_sparse_ffn_row_kernel`` for one row of ``x`` (a decode step) of width up to 8192: a program
   takes blocks of 4 slots in turn and loads each block's rows of W1 and W2T whole, at once, into
   its registers; its fp32 partial sum of the output stays there until the end.
   ``_sparse_ffn_kernel`` otherwise: a program takes blocks of ``BLOCK_S`` slots in turn (the number of
   blocks is read from ``count``). For each it computes the neurons' activations for ``BLOCK_M``
   rows of ``x`` (``gather_matmul.gather_dot``, bias and activation fused), zeroes those a row did
   not choose itself (``pred[m, j] <= t``), multiplies them by the neurons' rows of ``W2T`` and
   adds the product to its own fp32 partial sum of the output (a slice of it with
   ``N_SPLIT`` > 1). Packing the chosen neurons first makes every block full, so each program
   moves whole rows of weights; every weight byte is read once.
3. ``_sum_partials_kernel``: adds the partial sums and ``b2`` and casts.

One row with a low-rank predictor (``lowrank_sparse_ffn_row``) skips the scores in memory and the
compaction: ``_project_kernel`` computes ``x A`` in fp32 partial sums over programs, then
``_predict_neurons_kernel`` scores each program's interleaved share of the neurons and stores
the chosen ones as a short list per program, and the row kernel reads the lists one after the
other, numbering them from their counts.

The caller picks the number of programs (``lowering/hire_cost_model.ffn_programs``), trading
parallelism against partial-sum traffic, and ``BLOCK_S`` from the expected number of neurons.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from topk_compiler.kernels import MAX_GRID_YZ, cdiv, chains_launches, next_pow2
from topk_compiler.kernels.gather_matmul import ACTIVATIONS, activate, block_m, dot_precision, gather_dot

# (BLOCK_K, BLOCK_N, N_SPLIT, num_warps, num_stages) tried by the autotuner, all spill-free on
# sm_90a (ptxas -v). One row of x (GEMV, BLOCK_S <= 16; at 32 the 4-warp 512-wide tiles spill):
# wide tiles keep more bytes in flight per program. Tensor cores: BLOCK_S = 16 with BLOCK_M = 16;
# BLOCK_M = 32 spills 250-960 bytes, so more rows take more row blocks. N_SPLIT > 1 splits the
# output columns over programs, which re-read their W1 rows from L2 rather than HBM.
GEMV_CONFIGS = ((256, 256, 1, 4, 3), (512, 512, 1, 4, 3), (512, 512, 1, 8, 3), (256, 512, 2, 4, 3),
                (512, 512, 2, 8, 3), (256, 256, 4, 4, 3))
MMA_CONFIGS = ((256, 256, 1, 4, 2), (128, 128, 1, 4, 2), (256, 256, 2, 4, 2), (128, 256, 4, 8, 2))
MAX_GEMV_BLOCK_S = 16
MMA_BLOCK_S = 16
# One row of x with d and d_out <= ROW_MAX_WIDTH: ``_sparse_ffn_row_kernel``, ROW_BLOCK_S neurons a
# block, ROW_WARPS warps (spill-free on sm_90a at 8192 wide, ptxas -v). On an H200, the tiled GEMV
# took 21-25 us for 1862 neurons of a 4096 x 16384 FFN (benchmarks/results/profile_stages_h200.json):
# about 16 dependent round trips to memory per program of 16 neurons.
ROW_MAX_WIDTH = 8192
ROW_BLOCK_S = 4
ROW_WARPS = 8
MAX_BLOCK_M = 16
# Rows of x the FFN kernel takes: its blocks of rows lie on the grid's third dimension.
MAX_ROWS = MAX_GRID_YZ * MAX_BLOCK_M
# Neurons each selection program compacts, and the earlier blocks it counts per step: with
# d_ff = 16384 16 programs, each counting what comes before it in one step, took 3.6 us on an
# H200, where one program took 14.4 us in steps of 2048 and 9.6 us in one step of 16384
# (benchmarks/results/profile_stages_h200_{first,,hire}.json). Then the tile (rows x neurons)
# of each program of the many-row reduction.
SELECT_BLOCK = 1024
SELECT_EARLIER = 16
_ANY_BLOCK_ROWS = 16
_ANY_BLOCK_COLS = 256
# One row of x with a low-rank predictor (``lowrank_sparse_ffn_row``): rows of A per step of the
# projection (at most 8192 elements a step) and most projection programs (each writes one fp32
# partial of x A, summed again by every program of the prediction); elements of B a prediction
# program scores per step.
PROJECT_BLOCK_K = 64
MAX_PROJECT_PROGRAMS = 64
PREDICT_TILE = 16384
# At 8 warps ptxas gives the prediction 64 registers and a stack; at 4, 128 and none (sm_90a).
PREDICT_WARPS = 4
# The reduction of the partial sums loads up to _REDUCE_MAX_BLOCK_P partials of _REDUCE_TILE //
# BLOCK_P outputs in one step: at 117-264 partials, the earlier 32 a step over 64 outputs per
# program took 4.6-8.6 us on an H200 (benchmarks/results/profile_stages_h200{,_hire}.json),
# a dependent round trip to memory per step.
_REDUCE_MAX_BLOCK_P = 256
_REDUCE_TILE = 8192


def _configs(table):
    return [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "N_SPLIT": ns}, num_warps=w, num_stages=st)
            for bk, bn, ns, w, st in table]


@triton.jit
def _chosen(pred_ptr, n, N, M, threshold, pred_row_stride):
    """Whether some of the M rows of ``pred`` exceeds ``threshold`` at columns ``n`` (int32)."""
    in_n = n < N
    any_row = tl.zeros(n.shape, dtype=tl.int32)
    row_ptr = pred_ptr
    for _ in range(0, M):
        p = tl.load(row_ptr + n, mask=in_n, other=float("-inf"))
        any_row = any_row | (p.to(tl.float32) > threshold).to(tl.int32)
        row_ptr += pred_row_stride
    # Lanes past the row are never chosen: the padding ``other`` is -inf for float predictions,
    # but for the uint8 mask of several rows its conversion is undefined (0 in the interpreter,
    # not on the GPU).
    return (any_row != 0) & in_n


@triton.jit
def _select_neurons_kernel(pred_ptr, slots_ptr, count_ptr,   # pointers
                           M, N, threshold,                  # sizes, threshold
                           pred_row_stride,                  # strides
                           BLOCK: tl.constexpr, EARLIER: tl.constexpr):
    """Program g compacts block g of the neurons. It counts the chosen neurons of the blocks
    before its own itself, ``EARLIER`` blocks a step (no program waits on another), and the last
    program stores the total."""
    g = tl.program_id(0)
    before = tl.zeros([], dtype=tl.int32)
    for e0 in range(0, g, EARLIER):
        e = e0 + tl.arange(0, EARLIER)
        n = e[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        chosen = _chosen(pred_ptr, n, tl.minimum(g * BLOCK, N), M, threshold, pred_row_stride)
        before += tl.sum(tl.sum(chosen.to(tl.int32), axis=1), axis=0)
    n = g * BLOCK + tl.arange(0, BLOCK)
    chosen = _chosen(pred_ptr, n, N, M, threshold, pred_row_stride)
    position = before + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(slots_ptr + position, n.to(tl.int64), mask=chosen)
    if g == tl.num_programs(0) - 1:
        tl.store(count_ptr, before + tl.sum(chosen.to(tl.int32), axis=0))


@triton.jit
def _any_above_kernel(pred_ptr, mask_ptr,      # pointers
                      M, N, threshold,         # sizes, threshold
                      pred_row_stride,         # strides
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    n = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    in_n = n < N
    any_row = tl.zeros([BLOCK_COLS], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_ROWS):
        m = m0 + tl.arange(0, BLOCK_ROWS)
        p = tl.load(pred_ptr + m.to(tl.int64)[:, None] * pred_row_stride + n[None, :],
                    mask=(m < M)[:, None] & in_n[None, :], other=float("-inf"))
        any_row = any_row | tl.max((p.to(tl.float32) > threshold).to(tl.int32), axis=0)
    tl.store(mask_ptr + n, any_row.to(tl.uint8), mask=in_n)


@triton.jit
def _sparse_ffn_kernel(x_ptr, w1_ptr, b1_ptr, w2t_ptr, slots_ptr, count_ptr, pred_ptr, partial_ptr,  # pointers
                       M, K, N, P, threshold,                                                      # sizes
                       x_row_stride, w1_row_stride, w2t_row_stride, pred_row_stride,               # strides
                       HAS_BIAS: tl.constexpr, OWN_NEURONS: tl.constexpr, ACTIVATION: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLIT: tl.constexpr):
    """Program (p, j, i): slot blocks p, p + P, ... for rows block i, output slice j; its partial sum
    goes to partial[p] (stored by its first block and added to by the next; zeros if it has none).
    OWN_NEURONS: rows keep only the neurons they chose themselves (several rows of x)."""
    pid = tl.program_id(0)
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = m < M
    n_chunk = tl.cdiv(tl.cdiv(N, N_SPLIT), BLOCK_N) * BLOCK_N
    n_start = tl.program_id(1) * n_chunk
    n_stop = tl.minimum(n_start + n_chunk, N)
    out_rows = partial_ptr + (pid.to(tl.int64) * M + m.to(tl.int64)) * N
    count = tl.load(count_ptr)
    blocks = tl.cdiv(count, BLOCK_S)
    for block in range(pid, blocks, P):
        s = block * BLOCK_S + tl.arange(0, BLOCK_S)
        slots = tl.load(slots_ptr + s, mask=s < count, other=-1)
        valid = slots >= 0
        safe = tl.where(valid, slots, 0)
        h = gather_dot(x_ptr, w1_ptr, slots, m, M, K, x_row_stride, w1_row_stride,
                       BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S, BLOCK_K=BLOCK_K, PRECISION=PRECISION)
        if HAS_BIAS:
            h += tl.load(b1_ptr + safe, mask=valid, other=0.0).to(tl.float32)[None, :]
        h = activate(h, ACTIVATION)
        keep = valid[None, :] & in_m[:, None]
        if OWN_NEURONS:
            p = tl.load(pred_ptr + m.to(tl.int64)[:, None] * pred_row_stride + safe[None, :], mask=keep,
                        other=float("-inf"))
            keep = keep & (p.to(tl.float32) > threshold)
        h = tl.where(keep, h, 0.0)
        # The dense FFN rounds the hidden activations to the weight dtype before the second matmul.
        h = h.to(w2t_ptr.dtype.element_ty)
        w2_rows = w2t_ptr + safe.to(tl.int64) * w2t_row_stride
        for n0 in range(n_start, n_stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            in_n = n < n_stop
            w2 = tl.load(w2_rows[:, None] + n[None, :], mask=valid[:, None] & in_n[None, :], other=0.0)
            if BLOCK_M == 1:
                part = tl.sum(tl.reshape(h.to(tl.float32), (BLOCK_S,))[:, None] * w2.to(tl.float32), axis=0)[None, :]
            else:
                part = tl.dot(h, w2, input_precision=PRECISION)
            out_mask = in_m[:, None] & in_n[None, :]
            part += tl.load(out_rows[:, None] + n[None, :], mask=out_mask & (block > pid), other=0.0)
            tl.store(out_rows[:, None] + n[None, :], part, mask=out_mask)
    if pid >= blocks:  # no neurons for this program: its partial sum is zero
        for n0 in range(n_start, n_stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_rows[:, None] + n[None, :], tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                     mask=in_m[:, None] & (n < n_stop)[None, :])


@triton.jit
def _sparse_ffn_row_kernel(x_ptr, w1_ptr, b1_ptr, w2t_ptr, slots_ptr, count_ptr, partial_ptr,  # pointers
                           K, N, P, LISTS,                                                  # sizes
                           w1_row_stride, w2t_row_stride, list_stride,                      # strides
                           HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_S: tl.constexpr,
                           K_POW2: tl.constexpr, N_POW2: tl.constexpr, LISTS_POW2: tl.constexpr,
                           CHAINED: tl.constexpr):
    """One row of x. Program p takes slot blocks p, p + P, ...; of each it loads the neurons'
    whole rows of W1 and of W2T at once (the W2T rows do not wait for the activations, so a
    block is one round trip to memory), and it keeps its partial sum of the output in registers
    until one store at the end.

    The slots are one list of ``count[0]`` (LISTS_POW2 == 0), or LISTS lists, list i holding
    ``count[i]`` slots from ``slots + i * list_stride``, numbered one after the other: a
    program finds the list of each of its slots from the counts (no compaction launch).

    CHAINED: launched as a programmatic dependent of the kernel that wrote the slots and counts
    (``x`` was written before that kernel's chain began)."""
    if CHAINED:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    k = tl.arange(0, K_POW2)
    n = tl.arange(0, N_POW2)
    in_k = k < K
    in_n = n < N
    x = tl.load(x_ptr + k, mask=in_k, other=0.0).to(tl.float32)
    acc = tl.zeros([N_POW2], dtype=tl.float32)
    if CHAINED:
        gdc_wait()
    if LISTS_POW2 > 0:
        lists = tl.arange(0, LISTS_POW2)
        sizes = tl.load(count_ptr + lists, mask=lists < LISTS, other=0)
        ends = tl.cumsum(sizes, axis=0)
        count = tl.sum(sizes, axis=0)
    else:
        count = tl.load(count_ptr)
    for block in range(pid, tl.cdiv(count, BLOCK_S), P):
        s = block * BLOCK_S + tl.arange(0, BLOCK_S)
        if LISTS_POW2 > 0:
            owner = tl.sum((ends[None, :] <= s[:, None]).to(tl.int32), axis=1)
            start = tl.sum(tl.where(lists[None, :] == owner[:, None], (ends - sizes)[None, :], 0), axis=1)
            slots = tl.load(slots_ptr + owner.to(tl.int64) * list_stride + (s - start), mask=s < count, other=-1)
        else:
            slots = tl.load(slots_ptr + s, mask=s < count, other=-1)
        valid = slots >= 0
        safe = tl.where(valid, slots, 0).to(tl.int64)
        w1 = tl.load(w1_ptr + safe[:, None] * w1_row_stride + k[None, :], mask=valid[:, None] & in_k[None, :],
                     other=0.0)
        w2 = tl.load(w2t_ptr + safe[:, None] * w2t_row_stride + n[None, :], mask=valid[:, None] & in_n[None, :],
                     other=0.0)
        h = tl.sum(w1.to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            h += tl.load(b1_ptr + safe, mask=valid, other=0.0).to(tl.float32)
        h = tl.where(valid, activate(h, ACTIVATION), 0.0)
        # The dense FFN rounds the hidden activations to the weight dtype before the second matmul.
        h = h.to(w2t_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(h[:, None] * w2.to(tl.float32), axis=0)
    tl.store(partial_ptr + pid.to(tl.int64) * N + n, acc, mask=in_n)


@triton.jit
def _project_kernel(x_ptr, a_ptr, partial_ptr,   # pointers
                    K, R, CHUNK,                 # sizes
                    a_row_stride,                # strides
                    BLOCK_K: tl.constexpr, R_POW2: tl.constexpr, CHAINED: tl.constexpr):
    """Program g: ``x[c] @ A[c]`` in fp32 over its CHUNK rows c of A ([K, R]), into partial[g].
    CHAINED: the prediction may launch at once, to load its share of B meanwhile."""
    if CHAINED:
        gdc_launch_dependents()
    g = tl.program_id(0)
    r = tl.arange(0, R_POW2)
    acc = tl.zeros([R_POW2], dtype=tl.float32)
    for k0 in range(g * CHUNK, tl.minimum(g * CHUNK + CHUNK, K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < K
        x = tl.load(x_ptr + k, mask=in_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + k.to(tl.int64)[:, None] * a_row_stride + r[None, :], mask=in_k[:, None] & (r < R)[None, :],
                    other=0.0)
        acc += tl.sum(x[:, None] * a.to(tl.float32), axis=0)
    tl.store(partial_ptr + g * R_POW2 + r, acc)


@triton.jit
def _predict_neurons_kernel(xa_partial_ptr, b_ptr, b1_ptr, lists_ptr, counts_ptr,   # pointers
                            D_FF, R, G, P, threshold,                              # sizes, threshold
                            b_row_stride,                                          # strides
                            HAS_BIAS: tl.constexpr, R_POW2: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, CHAINED: tl.constexpr):
    """Program p predicts the pre-activations ``(x A) B[j] + b1[j]`` of the neurons j = p, p + P,
    ... (interleaved, so that runs of active neurons spread over the programs) from the G fp32
    partial sums of ``x A`` (``_project_kernel``), rounded to the weight dtype where the
    plain-torch predictor rounds (``x A``, then the scores). It stores those above the threshold,
    in order, as list p (``lists + p * BLOCK_J``), and their number as counts[p]: no scores go
    through memory and no program waits on another.

    CHAINED: launched as a programmatic dependent of ``_project_kernel``: the first tile of B is
    loaded before waiting for its partial sums."""
    if CHAINED:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    j = pid + tl.arange(0, BLOCK_J) * P
    in_j = j < D_FF
    score = tl.zeros([BLOCK_J], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_r = r < R
        b = tl.load(b_ptr + j.to(tl.int64)[:, None] * b_row_stride + r[None, :], mask=in_j[:, None] & in_r[None, :],
                    other=0.0)
        if CHAINED:
            gdc_wait()
        xa = tl.zeros([BLOCK_R], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            xa += tl.sum(tl.load(xa_partial_ptr + g[:, None] * R_POW2 + r[None, :],
                                 mask=(g < G)[:, None] & in_r[None, :], other=0.0), axis=0)
        xa = xa.to(b_ptr.dtype.element_ty).to(tl.float32)
        score += tl.sum(b.to(tl.float32) * xa[None, :], axis=1)
    if HAS_BIAS:
        score += tl.load(b1_ptr + j, mask=in_j, other=0.0).to(tl.float32)
    score = score.to(b_ptr.dtype.element_ty).to(tl.float32)
    chosen = (score > threshold) & in_j
    position = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(lists_ptr + pid * BLOCK_J + position, j, mask=chosen)
    tl.store(counts_ptr + pid, tl.sum(chosen.to(tl.int32), axis=0))


_sparse_ffn_gemv_tuned = triton.autotune(configs=_configs(GEMV_CONFIGS), key=["M", "K", "N", "P"])(_sparse_ffn_kernel)
_sparse_ffn_mma_tuned = triton.autotune(configs=_configs(MMA_CONFIGS), key=["M", "K", "N", "P"])(_sparse_ffn_kernel)


@triton.jit
def _sum_partials_kernel(partial_ptr, bias_ptr, out_ptr,   # pointers
                         P, M, N,                          # sizes
                         out_row_stride,                   # strides
                         HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         CHAINED: tl.constexpr):
    """CHAINED: launched as a programmatic dependent of the kernel that wrote the partial sums."""
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if CHAINED:
        gdc_wait()
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tile = tl.load(partial_ptr + (p.to(tl.int64)[:, None] * M + m) * N + n[None, :],
                       mask=(p < P)[:, None] & in_n[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=in_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * out_row_stride + n, acc.to(out_ptr.dtype.element_ty), mask=in_n)


def neurons_per_program(expected: int, rows: int, programs: int) -> int:
    """BLOCK_S for ``programs`` programs over about ``expected`` chosen neurons."""
    if rows > 1:
        return MMA_BLOCK_S
    return min(MAX_GEMV_BLOCK_S, max(4, next_pow2(cdiv(max(expected, 1), programs))))


def select_neurons(pred: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [d_ff] int64, count [1] int32): the neurons some row predicts above ``threshold``,
    in increasing order, in ``slots[:count]`` (the rest of ``slots`` is not written)."""
    rows, n = pred.shape
    assert pred.stride(1) == 1, "select_neurons: pred must have unit last stride"
    slots = torch.empty(n, dtype=torch.int64, device=pred.device)
    count = torch.empty(1, dtype=torch.int32, device=pred.device)
    if rows > 1:
        mask = torch.empty(1, n, dtype=torch.uint8, device=pred.device)
        _any_above_kernel[(cdiv(n, _ANY_BLOCK_COLS),)](pred, mask, rows, n, threshold, pred.stride(0),
                                                            BLOCK_ROWS=_ANY_BLOCK_ROWS, BLOCK_COLS=_ANY_BLOCK_COLS)
        pred, rows, threshold = mask, 1, 0.5
    _select_neurons_kernel[(cdiv(n, SELECT_BLOCK),)](pred, slots, count, rows, n, threshold, pred.stride(0),
                                                           BLOCK=SELECT_BLOCK, EARLIER=SELECT_EARLIER, num_warps=8)
    return slots, count


def sparse_ffn(x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2t: torch.Tensor,
               b2: torch.Tensor | None, pred: torch.Tensor, threshold: float, *, activation: str = "relu",
               programs: int = 264, expected: int = 0) -> torch.Tensor:
    """[rows, d_out] in x2d's dtype: row m of the FFN over the neurons j with ``pred[m, j] >
    threshold``. ``expected``: about how many neurons the rows choose together; ``programs`` (per
    block of rows, at most): enough to spread ``expected`` neurons, and a bound on the partial sums
    (``programs * rows * d_out`` fp32). Programs take more blocks when more neurons are chosen."""
    rows, k = x2d.shape
    d_ff, n = w2t.shape
    assert rows <= MAX_ROWS, f"sparse_ffn: at most {MAX_ROWS} rows (blocks of {MAX_BLOCK_M} on the grid), got {rows}"
    assert w1.shape == (d_ff, k) and w1.stride(1) == 1 and w2t.stride(1) == 1, \
        f"sparse_ffn: need w1 [{d_ff}, {k}] and w2t [{d_ff}, d_out], unit last strides"
    assert x2d.stride(1) == 1 and x2d.dtype == w1.dtype == w2t.dtype, \
        "sparse_ffn: x2d, w1, w2t: one dtype, unit last stride"
    assert pred.shape == (rows, d_ff) and pred.stride(1) == 1, f"sparse_ffn: pred must be [{rows}, {d_ff}]"
    if rows == 0:
        return torch.empty(rows, n, dtype=x2d.dtype, device=x2d.device)
    slots, count = select_neurons(pred, threshold)
    if rows == 1 and max(k, n) <= ROW_MAX_WIDTH:
        return _row_ffn(x2d, w1, b1, w2t, b2, slots, count, activation, programs, expected, chains_launches(x2d))
    out = torch.empty(rows, n, dtype=x2d.dtype, device=x2d.device)
    bm = min(block_m(rows), MAX_BLOCK_M)
    bs = neurons_per_program(expected, rows, programs)
    p = max(1, min(programs, cdiv(max(expected, 1), bs)))
    partial = torch.empty(p, rows, n, dtype=torch.float32, device=x2d.device)
    args = (x2d, w1, b1 if b1 is not None else slots, w2t, slots, count, pred, partial, rows, k, n, p, threshold,
            x2d.stride(0), w1.stride(0), w2t.stride(0), pred.stride(0))
    meta = dict(HAS_BIAS=b1 is not None, OWN_NEURONS=rows > 1, ACTIVATION=ACTIVATIONS[activation],
                PRECISION=dot_precision(w1.dtype), BLOCK_M=bm, BLOCK_S=bs)
    if x2d.is_cuda:
        def grid(META):
            return p, META["N_SPLIT"], cdiv(rows, bm)

        (_sparse_ffn_gemv_tuned if bm == 1 else _sparse_ffn_mma_tuned)[grid](*args, **meta)
    else:  # the interpreter: one fixed, small configuration
        _sparse_ffn_kernel[(p, 2, cdiv(rows, bm))](*args, **meta, BLOCK_K=32, BLOCK_N=16, N_SPLIT=2)
    return _sum_partials(partial, b2, out)


def lowrank_sparse_ffn_row(x2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w1: torch.Tensor,
                           b1: torch.Tensor | None, w2t: torch.Tensor, b2: torch.Tensor | None, threshold: float, *,
                           activation: str = "relu", programs: int = 132, expected: int = 0) -> torch.Tensor:
    """[1, d_out]: ``sparse_ffn`` of one row over the neurons whose low-rank prediction
    ``(x a) b^T + b1`` exceeds ``threshold``, in four launches (x a; the prediction and each
    program's list of chosen neurons; the row kernel over the lists; the reduction) and no scores
    in memory. ``programs``: of the prediction (each scores ``d_ff / programs`` neurons) and at
    most of the row kernel, which spreads about ``expected`` neurons (its partial sums are
    ``programs * d_out`` fp32 at most)."""
    rows, k = x2d.shape
    d_ff, n = w2t.shape
    r = a.shape[1]
    assert rows == 1 and max(k, n) <= ROW_MAX_WIDTH, f"lowrank_sparse_ffn_row: one row of width <= {ROW_MAX_WIDTH}"
    assert w1.shape == (d_ff, k) and a.shape == (k, r) and b.shape == (d_ff, r), \
        f"lowrank_sparse_ffn_row: need w1 [{d_ff}, {k}], a [{k}, r], b [{d_ff}, r]"
    assert all(t.stride(1) == 1 and t.dtype == x2d.dtype for t in (x2d, a, b, w1, w2t)), \
        "lowrank_sparse_ffn_row: x2d, a, b, w1, w2t: one dtype, unit last strides"
    r_pow2 = next_pow2(r)
    block_k = max(16, min(PROJECT_BLOCK_K, _REDUCE_TILE // r_pow2))
    g = min(cdiv(k, block_k), MAX_PROJECT_PROGRAMS)
    chunk = cdiv(cdiv(k, g), block_k) * block_k
    g = cdiv(k, chunk)
    xa_partial = torch.empty(g, r_pow2, dtype=torch.float32, device=x2d.device)
    chained = chains_launches(x2d)
    _project_kernel[(g,)](x2d, a, xa_partial, k, r, chunk, a.stride(0), BLOCK_K=block_k, R_POW2=r_pow2,
                          CHAINED=chained)
    lists_count = max(1, min(programs, d_ff))
    block_j = next_pow2(cdiv(d_ff, lists_count))
    block_r = min(r_pow2, max(16, PREDICT_TILE // block_j))
    lists = torch.empty(lists_count, block_j, dtype=torch.int32, device=x2d.device)
    counts = torch.empty(lists_count, dtype=torch.int32, device=x2d.device)
    _predict_neurons_kernel[(lists_count,)](xa_partial, b, b1 if b1 is not None else b, lists, counts, d_ff, r, g,
                                            lists_count, threshold, b.stride(0), HAS_BIAS=b1 is not None,
                                            R_POW2=r_pow2, BLOCK_J=block_j, BLOCK_R=block_r,
                                            BLOCK_G=max(1, min(next_pow2(g), _REDUCE_TILE // block_r)),
                                            CHAINED=chained, num_warps=PREDICT_WARPS, launch_pdl=chained)
    return _row_ffn(x2d, w1, b1, w2t, b2, lists, counts, activation, programs, expected, chained)


def _row_ffn(x2d, w1, b1, w2t, b2, slots, count, activation, programs, expected, chained):
    """The row kernel over ``slots`` (one list, or one list per row of a 2-D ``slots``), reduced;
    ``chained``: launched as programmatic dependents (``kernels.chains_launches``)."""
    k, n = x2d.shape[1], w2t.shape[1]
    p = max(1, min(programs, cdiv(max(expected, 1), ROW_BLOCK_S)))
    lists = slots.shape[0] if slots.dim() == 2 else 0
    partial = torch.empty(p, 1, n, dtype=torch.float32, device=x2d.device)
    _sparse_ffn_row_kernel[(p,)](x2d, w1, b1 if b1 is not None else slots, w2t, slots, count, partial, k, n, p, lists,
                                 w1.stride(0), w2t.stride(0), slots.stride(0) if lists else 0,
                                 HAS_BIAS=b1 is not None, ACTIVATION=ACTIVATIONS[activation], BLOCK_S=ROW_BLOCK_S,
                                 K_POW2=next_pow2(k), N_POW2=next_pow2(n), LISTS_POW2=next_pow2(lists) if lists else 0,
                                 CHAINED=chained, num_warps=ROW_WARPS, launch_pdl=chained)
    return _sum_partials(partial, b2, torch.empty(1, n, dtype=x2d.dtype, device=x2d.device), chained=chained)


def _sum_partials(partial: torch.Tensor, b2: torch.Tensor | None, out: torch.Tensor, *,
                  chained: bool = False) -> torch.Tensor:
    """out = the sum of the partial sums [programs, rows, d_out] + b2, in out's dtype; ``chained``:
    launched as a programmatic dependent of the kernel that wrote them."""
    p, rows, n = partial.shape
    block_p = min(next_pow2(p), _REDUCE_MAX_BLOCK_P)
    block_n = min(next_pow2(n), max(16, _REDUCE_TILE // block_p))
    _sum_partials_kernel[(rows, cdiv(n, block_n))](
        partial, b2 if b2 is not None else partial, out, p, rows, n, out.stride(0),
        HAS_BIAS=b2 is not None, BLOCK_P=block_p, BLOCK_N=block_n, CHAINED=chained, launch_pdl=chained)
    return out
