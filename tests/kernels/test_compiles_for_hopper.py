"""Every kernel family compiles for sm_90 (Hopper) down to a cubin, without a GPU.

The interpreter (how the other kernel tests run here) accepts code the compiler rejects, e.g. a
constexpr reassigned in a ``static_range`` loop: one such kernel reached the GPU and failed
there. ``benchmarks/compile_check.py --families`` calls one launcher of each family at a
realistic size with its launches intercepted and builds each launch with the ptxas that ships
with Triton. It runs in a subprocess: the kernels must be decorated without TRITON_INTERPRET,
which this test session sets.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_family_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--families"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    from benchmarks.compile_check import families

    assert run.stdout.count("ok  ") == len(families()), run.stdout
