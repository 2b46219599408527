"""``kernels.launch.Launch``: the first launch of each tensor specialization goes through Triton's
JIT, later ones call the compiled kernel with the same arguments. The JIT and the compiled kernel
are stand-ins here (what each receives is the behaviour under test); the real kernel runs in the
last tests (through the interpreter on a CPU, compiled on a GPU)."""

import pytest
import torch
import triton
import triton.language as tl

from tests.conftest import KERNEL_DEVICE
from topk_compiler.kernels.launch import Launch


class CompiledStandIn:
    packed_metadata = object()

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class KernelStandIn:
    """A JITFunction's interface: ``arg_names`` and ``kernel[grid](*args, **kwargs)``, returning
    the compiled kernel (None, as the interpreter does, with ``compiles=False``)."""

    __name__ = "kernel"
    arg_names = ["x_ptr", "out_ptr", "n", "stride", "BLOCK"]

    def __init__(self, compiles=True):
        self.calls, self.compiles = [], compiles

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return CompiledStandIn(self.calls) if self.compiles else None
        return jit


def test_later_launches_call_the_compiled_kernel_with_every_argument_in_order():
    kernel = KernelStandIn()
    launch = Launch(kernel, (4,), n=10, stride=16, BLOCK=32, num_warps=2)
    x, out = torch.empty(4, 16), torch.empty(4, 16)
    launch(x, out)
    launch(x, out)
    assert kernel.calls[0] == ("jit", (4,), (x, out), dict(n=10, stride=16, BLOCK=32, num_warps=2))
    assert kernel.calls[1] == ("compiled", (4, 1, 1), (x, out, 10, 16, 32))
    assert len(kernel.calls) == 2


def test_a_compile_option_given_as_none_is_left_to_the_compiler():
    kernel = KernelStandIn()
    x = torch.empty(16)
    Launch(kernel, (1,), n=10, stride=16, BLOCK=32, maxnreg=None)(x, x)
    Launch(kernel, (1,), n=10, stride=16, BLOCK=32, maxnreg=64)(x, x)
    assert kernel.calls[0][3] == dict(n=10, stride=16, BLOCK=32)
    assert kernel.calls[1][3] == dict(n=10, stride=16, BLOCK=32, maxnreg=64)


def test_a_tensor_of_another_alignment_or_dtype_goes_through_the_jit():
    kernel = KernelStandIn()
    launch = Launch(kernel, (1,), n=10, stride=16, BLOCK=32)
    base = torch.empty(64)
    launch(base[:16], base[16:32])
    launch(base[1:17], base[16:32])  # 4 bytes off a 16-byte boundary: Triton specializes on that
    launch(base[:16].double(), base[16:32])
    launch(base[1:17], base[16:32])
    assert [c[0] for c in kernel.calls] == ["jit", "jit", "jit", "compiled"]


def test_without_a_compiled_kernel_every_launch_goes_through_the_jit():
    kernel = KernelStandIn(compiles=False)
    launch = Launch(kernel, (1,), n=10, stride=16, BLOCK=32)
    x = torch.empty(16)
    for _ in range(3):
        launch(x, x)
    assert [c[0] for c in kernel.calls] == ["jit"] * 3


def test_arguments_must_fix_every_parameter_after_the_tensors():
    with pytest.raises(AssertionError, match="leading tensors"):
        Launch(KernelStandIn(), (1,), n=10, BLOCK=32)
    with pytest.raises(AssertionError, match="no parameters"):
        Launch(KernelStandIn(), (1,), n=10, stride=16, BLOCK=32, width=3)
    launch = Launch(KernelStandIn(), (1,), n=10, stride=16, BLOCK=32)
    with pytest.raises(AssertionError, match="expected 2 tensors"):
        launch(torch.empty(1))


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * factor, mask=mask)


def test_a_real_kernel_gives_the_same_result_at_every_launch():
    launch = Launch(_scale_kernel, (3,), n=40, factor=3, BLOCK=16)
    base = torch.arange(48, dtype=torch.float32, device=KERNEL_DEVICE)
    for x in (base[:40], base[:40] + 1, base[1:41]):  # the last one unaligned
        out = torch.zeros(40, device=KERNEL_DEVICE)
        launch(x, out)
        torch.testing.assert_close(out, x * 3, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel is called directly on a GPU only")
def test_on_a_gpu_the_second_launch_calls_the_compiled_kernel():
    launch = Launch(_scale_kernel, (3,), n=40, factor=3, BLOCK=16)
    x, out = torch.randn(40, device="cuda"), torch.zeros(40, device="cuda")
    launch(x, out)
    assert len(launch._compiled) == 1
    x.normal_()
    launch(x, out)
    torch.testing.assert_close(out, x * 3, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(x, out)
    x.normal_()
    graph.replay()
    torch.testing.assert_close(out, x * 3, rtol=0, atol=0)
