"""The approx_topk backend end to end: Dynamo -> our passes -> Inductor (compiles are slow on
CPU, ~10-20 s each, so this file holds the few that need Inductor)."""

import subprocess
import sys

import pytest
import torch

import topk_compiler
from topk_compiler import measured_recall
from topk_compiler.config import ApproxTopkConfig

ALWAYS = {"recall_target": 0.9, "rewrite": "always"}


class TwoSites(torch.nn.Module):
    """A big top-k worth approximating and a tiny one that is not, with work around them."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, scores, small):
        top = torch.topk(torch.relu(scores) * 2.0, 128, dim=-1)
        tiny = self.proj(small).topk(3, dim=-1)
        return top.values.sum(-1), top.indices, tiny.values


def test_backend_rewrites_big_site_and_compiles_the_rest(device):
    torch._dynamo.reset()
    model = TwoSites().to(device)
    scores, small = torch.randn(256, 8192, device=device), torch.randn(4, 64, device=device)
    report = topk_compiler.explain(model, scores, small, **ALWAYS)
    # The HiRE logits pass also sees linear -> topk at the tiny site (and declines: grad mode is on).
    assert [(d.pass_name, d.rewritten) for d in report] == [
        ("hire_logits", False), ("topk_rewrite", True), ("topk_rewrite", False)]
    compiled = torch.compile(model, backend="approx_topk", options=ALWAYS)
    total, indices, tiny = compiled(scores, small)
    eager_total, _, eager_tiny = model(scores, small)
    torch.testing.assert_close(tiny, eager_tiny)
    assert measured_recall(torch.relu(scores) * 2.0, indices, 128) >= 0.9 - 0.02


def test_recall_one_equals_eager_and_gradients_match(device):
    torch._dynamo.reset()
    x = torch.randn(32, 4096, device=device, dtype=torch.float64, requires_grad=True)

    def fn(x):
        values, indices = torch.topk(x * 3.0, 100, dim=1)
        return values, indices

    compiled = torch.compile(fn, backend="approx_topk", options={"recall_target": 1.0})
    values, indices = compiled(x)
    expected_values, expected_indices = fn(x)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    (values * torch.arange(100, device=device)).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    (expected_values * torch.arange(100, device=device)).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)


def test_dynamic_shapes_compile_once_and_serve_several_lengths(device):
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs, **kwargs):
        compiles.append(1)
        return topk_compiler.approx_topk_backend(gm, example_inputs, options=ALWAYS)

    fn = torch.compile(lambda x: torch.topk(x, 64, dim=-1), backend=counting_backend, dynamic=True)
    for n in (4096, 6000, 9000):
        x = torch.randn(64, n, device=device)
        values, indices = fn(x)
        torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0)
        assert measured_recall(x, indices, 64) >= 0.9 - 0.02
    assert len(compiles) == 1


def _installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("topk-compiler")
    except metadata.PackageNotFoundError:
        return False
    return True


# The GPU machine runs a copy of the checkout that is not pip-installed: no entry point there.
@pytest.mark.skipif(not _installed(), reason="topk-compiler is not installed: no entry points registered")
def test_backend_name_resolves_through_the_entry_point_without_import():
    code = (
        "import torch\n"
        "f = torch.compile(lambda x: torch.topk(x, 3), backend='approx_topk')\n"
        "v, i = f(torch.randn(4, 10))\n"
        "import sys; assert 'topk_compiler' in sys.modules; print('ok', tuple(v.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok (4, 3)" in out.stdout


def test_unknown_option_is_a_clear_error():
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.topk(x, 3), backend="approx_topk", options={"recal_target": 0.9})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['recal_target'\]; valid options: .*'recall_target'"):
        f(torch.randn(4, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_runs_under_cuda_graphs():
    torch._dynamo.reset()
    x = torch.randn(512, 32768, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda x: torch.topk(x, 2048, dim=-1), backend="approx_topk",
                       options={"recall_target": 0.95, "mode": "reduce-overhead"})
    for _ in range(3):  # warm-up, record, replay
        values, indices = fn(x)
    torch.cuda.synchronize()
    assert measured_recall(x, indices, 2048) >= 0.95 - 0.02
    torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0)


def test_mode_travels_in_options_because_torch_compile_refuses_both():
    assert ApproxTopkConfig.from_options({"mode": "reduce-overhead"}).mode == "reduce-overhead"
    with pytest.raises(ValueError, match="mode must be one of"):
        ApproxTopkConfig.from_options({"mode": "fast"})


@pytest.mark.parametrize("options,replays", [
    ({}, False),
    ({"mode": "reduce-overhead"}, True),
    ({"mode": "max-autotune-no-cudagraphs"}, False),
    ({"inductor": {"triton.cudagraphs": True}}, True),
    ({"mode": "reduce-overhead", "inductor": {"triton.cudagraphs": False}}, False),
])
def test_passes_know_whether_the_graph_replays_as_cuda_graphs(options, replays):
    assert ApproxTopkConfig.from_options(options).replays_cuda_graphs() is replays


def test_torch_compiles_mode_reaches_the_passes(monkeypatch):
    """torch.compile(mode=...) without options: the passes price sites as the mode runs them."""
    from topk_compiler import backend

    seen = []
    monkeypatch.setattr(backend, "run_passes", lambda gm, inputs, config: seen.append(config.mode))
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda gm, inputs, config_patches=None: gm.forward)
    torch._dynamo.reset()
    torch.compile(lambda x: torch.topk(x, 3), backend="approx_topk", mode="reduce-overhead")(torch.randn(4, 10))
    torch._dynamo.reset()
    assert seen == ["reduce-overhead"]
