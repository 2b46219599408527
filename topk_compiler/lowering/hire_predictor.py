"""HiRE predictors: cheap stand-ins for a weight ``W`` ([n, d], one row per output) that rank the
rows of ``W`` by ``x . W[j]`` without reading ``W``.

* low-rank (rank r): ``W ~ B A^T`` with ``A`` [d, r] the top-r right singular vectors of ``W``
  and ``B = W A`` [n, r]; scores ``(x A) B^T`` cost ``r (d + n)`` weights instead of ``d n``.
  ``A`` comes from the eigenvectors of the Gram matrix ``W^T W`` ([d, d], accumulated in fp32 over
  row chunks), which is the exact truncated SVD, deterministic, and touches no RNG state.
* int8 / int4: a copy of ``W`` quantized per row (symmetric, ``scale[j] = max|W[j]| / 127`` or
  ``/ 7``); int4 packs two values per byte (column ``2i`` in the low nibble, ``2i+1`` in the high).

Predictors live in a process-wide cache keyed by the weight's storage, shape, strides and dtype.
An entry is valid while the tensor it was built from is alive, still owns that storage and has
the same version counter (every in-place update, e.g. ``optimizer.step()`` or ``weight.copy_()``,
bumps it); otherwise the next lookup rebuilds it. The backend builds each predictor when it
compiles a graph; the ops look it up on every call. The same cache holds the transposed copy of
an FFN's output weight that the GPU kernels read row by row.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

PREDICTOR_KINDS = ("lowrank", "int8", "int4")
# Rows of W converted to fp32 at a time while building (bounds the temporary memory).
_BUILD_CHUNK_ROWS = 8192
# Rows of a quantized W dequantized at a time by the plain-torch scores.
_SCORE_CHUNK_ROWS = 8192
_QMAX = {"int8": 127, "int4": 7}


@dataclass(frozen=True, eq=False)
class LowRankPredictor:
    """scores(x) = (x A) B^T, the rank-r truncated SVD of W applied to x.

    args:
        a: [d, rank] top right singular vectors of W (columns), in W's dtype.
        b: [n, rank] W a, in W's dtype.
    """

    a: torch.Tensor
    b: torch.Tensor
    kind: str = "lowrank"

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def scores(self, x2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, n] predicted ``x2d @ W.T + bias`` (in W's dtype)."""
        xa = x2d.to(self.a.dtype) @ self.a
        if bias is None:
            return xa @ self.b.T
        return torch.addmm(bias.to(self.b.dtype), xa, self.b.T)


@dataclass(frozen=True, eq=False)
class QuantizedPredictor:
    """scores(x) = (x q^T) * scale, with q the per-row quantized W.

    args:
        kind: "int8" or "int4".
        q: int8 [n, d], or uint8 [n, ceil(d / 2)] holding two int4 values per byte.
        scale: fp32 [n], one scale per row of W.
        in_features: d.
    """

    kind: str
    q: torch.Tensor
    scale: torch.Tensor
    in_features: int

    rank = 0

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * 4

    def dequantized_rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 rows ``start:stop`` of the dequantized W (what the scores use)."""
        q = self.q[start:stop]
        if self.kind == "int4":
            q = unpack_int4(q, self.in_features)
        return q.to(torch.float32) * self.scale[start:stop, None]

    def scores(self, x2d: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, n] fp32 predicted ``x2d @ W.T + bias``."""
        if uses_kernel(x2d):
            from topk_compiler.kernels.quantized_scores import quantized_scores

            return quantized_scores(x2d.contiguous(), self.q, self.scale, bias, bits=8 if self.kind == "int8" else 4,
                                    in_features=self.in_features)
        x32 = x2d.to(torch.float32)
        n = self.q.shape[0]
        out = torch.empty(x2d.shape[0], n, dtype=torch.float32, device=x2d.device)
        for start in range(0, n, _SCORE_CHUNK_ROWS):
            stop = min(n, start + _SCORE_CHUNK_ROWS)
            out[:, start:stop] = x32 @ self.dequantized_rows(start, stop).T
        if bias is not None:
            out += bias.to(torch.float32)
        return out


Predictor = LowRankPredictor | QuantizedPredictor
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether the HiRE ops run their Triton kernels on ``x`` (CUDA, a Triton dtype, Triton
    installed, rows their grids take) rather than their plain-torch path."""
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        return False
    from topk_compiler.kernels import has_triton

    return has_triton() and rows_fit_kernels(x)


def rows_fit_kernels(x: torch.Tensor) -> bool:
    """Whether ``x``'s rows (all but its last dimension) fit the HiRE kernels' grids: their blocks
    of rows lie on a grid's second or third dimension, the FFN kernel's of 16 rows the shortest
    (``kernels/sparse_ffn.MAX_ROWS``, about 1M rows). More run the plain-torch path. Needs Triton."""
    from topk_compiler.kernels.sparse_ffn import MAX_ROWS

    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return rows <= MAX_ROWS


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], [n, d] -> uint8 [n, ceil(d / 2)] (even column low nibble)."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.int16) & 0xF
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [n, ceil(d / 2)] -> int8 [n, d], inverse of :func:`pack_int4`."""
    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = ((p >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(p.shape[0], -1)[:, :in_features].to(torch.int8)


def right_singular_vectors(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """[d, rank] fp32: the top ``rank`` right singular vectors of ``weight`` [n, d]."""
    d = weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float32, device=weight.device)
    for chunk in weight.detach().split(_BUILD_CHUNK_ROWS):
        c = chunk.to(torch.float32)
        gram.addmm_(c.T, c)
    # fp64 eigh: the Gram matrix squares W's condition number; d <= 8192 keeps it cheap.
    _, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, -rank:].flip(-1).to(torch.float32)


def build_predictor(weight: torch.Tensor, kind: str, rank: int = 0) -> Predictor:
    """A predictor of ``weight`` [n, d] (no caching: see :func:`predictor_for`)."""
    if kind not in PREDICTOR_KINDS:
        raise ValueError(f"predictor must be one of {PREDICTOR_KINDS}, got {kind!r}")
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"predictor: weight must be a 2-D floating tensor, got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach()
    with torch.no_grad():
        if kind == "lowrank":
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be a positive int for a lowrank predictor, got {rank!r}")
            rank = min(rank, *w.shape)
            a = right_singular_vectors(w, rank)
            b = torch.cat([chunk.to(torch.float32) @ a for chunk in w.split(_BUILD_CHUNK_ROWS)])
            return LowRankPredictor(a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous())
        qmax = _QMAX[kind]
        scale = torch.cat([c.to(torch.float32).abs().amax(dim=1) for c in w.split(_BUILD_CHUNK_ROWS)]) / qmax
        scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.cat([
            (c.to(torch.float32) / s[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
            for c, s in zip(w.split(_BUILD_CHUNK_ROWS), scale.split(_BUILD_CHUNK_ROWS))
        ])
        if kind == "int4":
            q = pack_int4(q)
        return QuantizedPredictor(kind, q.contiguous(), scale.contiguous(), w.shape[1])


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _key(weight: torch.Tensor, what: tuple) -> tuple:
    return (what, weight.device, weight.dtype, tuple(weight.shape), weight.stride(), weight.data_ptr())


class _Entry:
    __slots__ = ("ref", "data_ptr", "version", "value")

    def __init__(self, weight: torch.Tensor, value):
        self.ref = weakref.ref(weight)
        self.data_ptr = weight.data_ptr()
        self.version = _version(weight)
        self.value = value

    def valid_for(self, weight: torch.Tensor) -> bool:
        owner = self.ref()
        return owner is not None and owner.data_ptr() == self.data_ptr and _version(weight) == self.version


class PredictorCache:
    """Built predictors (and transposed copies), valid while their weight is unchanged."""

    def __init__(self):
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, weight: torch.Tensor, what: tuple, build):
        key = _key(weight, what)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.valid_for(weight):
                return entry.value
        value = build()
        with self._lock:
            self.builds += 1
            self._entries = {k: e for k, e in self._entries.items() if e.ref() is not None
                             and e.ref().data_ptr() == e.data_ptr}
            self._entries[key] = _Entry(weight, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


PREDICTORS = PredictorCache()


def predictor_for(weight: torch.Tensor, kind: str, rank: int = 0) -> Predictor:
    """The cached predictor of ``weight`` (built now if missing, or stale: the weight changed)."""
    rank = min(rank, *weight.shape) if kind == "lowrank" else 0
    return PREDICTORS.get(weight, ("predictor", kind, rank), lambda: build_predictor(weight, kind, rank))


def transposed_copy(weight: torch.Tensor) -> torch.Tensor:
    """The cached contiguous ``weight.T`` (rows of a [d, d_ff] FFN output weight, one per neuron)."""
    return PREDICTORS.get(weight, ("transpose",), lambda: weight.detach().T.contiguous())
