"""The ``approx_topk`` torch.compile backend: our passes on the Dynamo graph, then Inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml) and again on
``import topk_compiler``, so ``backend="approx_topk"`` works either way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from topk_compiler.config import ApproxTopkConfig
from topk_compiler.passes.base import RewriteReport
from topk_compiler.passes.manager import PassManager

BACKEND_NAME = "approx_topk"
logger = logging.getLogger("topk_compiler")


def run_passes(gm: torch.fx.GraphModule, example_inputs: list, config: ApproxTopkConfig,
               report: RewriteReport | None = None) -> RewriteReport:
    """Rewrites ``gm`` in place; returns the decisions."""
    report = PassManager(config, report)(gm, example_inputs)
    logger.info("approx_topk: %d site(s), %d rewritten", len(report), len(report.rewritten))
    return report


def approx_topk_backend(gm: torch.fx.GraphModule, example_inputs: list, *,
                        options: Mapping[str, Any] | None = None, mode: str | None = None):
    """torch.compile backend: rewrite top-k sites, then compile the graph with Inductor.

    ``options`` are ours (``ApproxTopkConfig.from_options``); ``mode`` is torch.compile's
    ("reduce-overhead", "max-autotune", ...) and means what it means for Inductor. torch.compile
    passes one of the two, never both, so with options the mode comes as ``options["mode"]``.
    """
    config = ApproxTopkConfig.from_options(options)
    if mode is not None:
        config = dataclasses.replace(config, mode=mode)
    run_passes(gm, example_inputs, config)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config.inductor_patches() or None)


def register() -> None:
    """Makes ``backend="approx_topk"`` resolve after ``import topk_compiler``.

    The name goes into Dynamo's table of lazily loaded backends rather than through
    ``register_backend``: when Dynamo itself loads our entry point, it registers the function
    after importing this package, and a second registration would be refused as a duplicate.
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if not hasattr(registry, "_BACKENDS"):  # a torch whose registry changed shape: the public way
        if BACKEND_NAME not in registry.list_backends(exclude_tags=()):
            registry.register_backend(approx_topk_backend, name=BACKEND_NAME)
        return
    if BACKEND_NAME in registry._COMPILER_FNS or BACKEND_NAME in registry._BACKENDS:
        return
    registry._BACKENDS[BACKEND_NAME] = EntryPoint(
        name=BACKEND_NAME, value=f"{__name__}:approx_topk_backend", group="torch_dynamo_backends"
    )
