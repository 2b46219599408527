"""Triton int8 / int4 scores against the dequantized weight in torch (interpreter without a GPU)."""

import pytest
import torch

from tests.conftest import KERNEL_DEVICE
from topk_compiler.kernels.quantized_scores import quantized_scores
from topk_compiler.lowering.hire_predictor import build_predictor

DTYPES = [(torch.float32, 1e-4, 1e-5), (torch.float16, 2e-2, 2e-3)] + (
    [(torch.bfloat16, 5e-2, 2e-2)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows,n,d", [(1, 50, 37), (3, 70, 64), (18, 33, 31), (1, 1, 1)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_equals_dequantized(kind, rows, n, d, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(rows * n + d)
    predictor = build_predictor(torch.randn(n, d, generator=gen).to(dtype).to(KERNEL_DEVICE), kind)
    x = torch.randn(rows, d, generator=gen).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(KERNEL_DEVICE)
    out = quantized_scores(x, predictor.q, predictor.scale, bias, bits=8 if kind == "int8" else 4, in_features=d)
    expected = x.float() @ predictor.dequantized_rows(0, n).T + bias
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
