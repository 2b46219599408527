"""topk-compiler: a torch.compile backend that makes top-k fast on GPUs by trading a controlled,
measured amount of recall for parallelism.

    fast = torch.compile(model, backend="approx_topk", options={"recall_target": 0.95})

Importing the package registers the ``topk_compiler::bucketed_topk`` op (and the HiRE ops
``hire_logits_topk`` and ``hire_ffn``) and the ``approx_topk`` backend name (which also resolves
through the package's entry point without an import). ``calibrate(model, samples,
recall_target=...)`` measures HiRE recall on your data and returns the options to compile with.
"""

from topk_compiler.backend import approx_topk_backend, register as _register_backend
from topk_compiler.calibrate import calibrate
from topk_compiler.config import ApproxTopkConfig, HireConfig, SiteOverride, TopkPassConfig
from topk_compiler.explain import explain
from topk_compiler.lowering.bucketed_topk import approx_topk
from topk_compiler.lowering.recall_model import expected_recall, guaranteed_recall, measured_recall
from topk_compiler.passes.base import RewriteDecision, RewriteReport

_register_backend()

__all__ = [
    "ApproxTopkConfig",
    "HireConfig",
    "RewriteDecision",
    "RewriteReport",
    "SiteOverride",
    "TopkPassConfig",
    "approx_topk",
    "approx_topk_backend",
    "calibrate",
    "expected_recall",
    "explain",
    "guaranteed_recall",
    "measured_recall",
]
