"""Builds and loads the peer, graphcore-research/pytorch-approx-topk (the paper's CUDA release),
from a checkout of it for ``bench_topk --peer PATH``. The checkout is fetched code and stays out
of the repository (``.peer/`` is ignored; carry it to the GPU); this adapter is ours.

The build (``torch.utils.cpp_extension.load`` of its one ``.cu`` file, through the checkout's own
``load_cuda_extension``) runs in a child process while the benchmark measures everything else,
into a build folder inside the checkout, so that the benchmark's ``load`` finds it built. It
builds for the device's architecture (``TORCH_CUDA_ARCH_LIST``, e.g. 9.0 for an H100 or H200):
with no target named, nvcc embeds older machine code and PTX that the driver compiles at start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SOURCE = Path("approx_topk") / "priority_queue_approx_topk.cu"
BUILD_DIR = "torch_extensions"
LOG_NAME = "build.log"
# Run in the child: the checkout's loader, as its own topk calls it ("optimize": -O3).
_BUILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from approx_topk.cuda_extensions import load_cuda_extension; "
          "load_cuda_extension('priority_queue_approx_topk.cu', compile_mode='optimize')")


def build_environment(checkout: Path, arch: str | None = None) -> dict[str, str]:
    """The variables the build and the load share: the build folder, and the target."""
    env = {"TORCH_EXTENSIONS_DIR": str(Path(checkout).resolve() / BUILD_DIR)}
    if arch is None and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch = f"{major}.{minor}"
    if arch is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    return env


class BackgroundBuild:
    """The peer's extension, building in a child process from the moment this is made."""

    def __init__(self, checkout: Path, arch: str | None = None):
        checkout = Path(checkout)
        if not (checkout / SOURCE).is_file():
            raise FileNotFoundError(f"{checkout / SOURCE} not found: is {checkout} a checkout of "
                                    "graphcore-research/pytorch-approx-topk?")
        (checkout / BUILD_DIR).mkdir(exist_ok=True)
        self.log_path = checkout / BUILD_DIR / LOG_NAME
        with open(self.log_path, "w") as log:
            self._process = subprocess.Popen([sys.executable, "-c", _BUILD, str(checkout.resolve())], stdout=log,
                                             stderr=subprocess.STDOUT,
                                             env={**os.environ, **build_environment(checkout, arch)})

    def wait(self, timeout_s: float) -> str | None:
        """None once built; otherwise why not (the build is stopped if it runs past ``timeout_s``)."""
        try:
            code = self._process.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            return f"build still running after {timeout_s:.0f} s: stopped"
        return None if code == 0 else f"build failed (exit {code}): {self.last_line()}"

    def last_line(self) -> str:
        """The build log's last non-empty line."""
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else ""


def load(checkout: Path):
    """The peer's ``topk(xs, k, dim, j, k_mult, interleaved, multithread_buckets)``, its extension
    loaded from the build folder ``BackgroundBuild`` filled."""
    checkout = Path(checkout).resolve()
    os.environ.update(build_environment(checkout))
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from approx_topk import topk

    return topk
