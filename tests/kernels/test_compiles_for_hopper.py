"""Every kernel family compiles for sm_90 (Hopper) down to a cubin, without a GPU.

The interpreter (how the other kernel tests run here) accepts code the compiler rejects, e.g. a
constexpr reassigned in a ``static_range`` loop: one such kernel reached the GPU and failed
there. ``benchmarks/compile_check.py --families`` calls one launcher of each family at a
realistic size with its launches intercepted and builds each launch with the ptxas that ships
with Triton. It runs in a subprocess: the kernels must be decorated without TRITON_INTERPRET,
which this test session sets.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def families_output() -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--families"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_every_kernel_family_compiles_for_sm90(families_output):
    from benchmarks.compile_check import families

    assert families_output.count("ok  ") == len(families()), families_output


def test_stage_one_streams_whole_steps_without_masks(families_output):
    """The fused kernel's stage 1 has two streaming loops: steps wholly inside the row, without
    masks, then the rest with them; the first must be the shorter (a compare and a select per
    element fewer)."""
    line = next(l for l in families_output.splitlines() if l.startswith("ok  fused, k=64, bitonic, one warp: "))
    (fused,) = ast.literal_eval(line.split(": ", 1)[1])
    unmasked, masked = fused["load_loops"]
    assert unmasked < masked


def _launches(families_output: str, name: str) -> list[dict]:
    line = next(l for l in families_output.splitlines() if l.startswith(f"ok  {name}: "))
    return ast.literal_eval(line.split(": ", 1)[1])


def test_stage_two_keeps_stage_one_resident(families_output):
    """The fused kernel's registers are set by stage 2, and they decide how many programs stream
    at once. Unsorted output goes through packed entries: scattering indices and values from
    the candidates kept 182 registers a thread at 4096 survivors, one program an SM. A cap
    (``max_registers``) holds."""
    (unsorted,) = _launches(families_output, "fused, k=2048 of 32768, unsorted")
    assert unsorted["registers"] <= 104
    (capped,) = _launches(families_output, "fused, k=2048 of 32768, sorted, registers capped")
    assert capped["registers"] <= 64


def test_share_kernel_sums_a_rounds_counts_once(families_output):
    """A threshold round by digits in buckets under 1024 slots sums its three counts as fields of
    one int32: a warp's sum is one ``redux.sum`` and a round shorter than one that counts each
    digit apart (buckets of 1792 slots, whose counts do not fit: every key in four lanes, shuffle
    trees)."""
    (packed,) = _launches(families_output, "wide buckets fp32, k=1434 of 14336, 16 shares, counts sharing an int32")
    (separate,) = _launches(families_output, "wide buckets fp32, k=1434 of 14336, 8 shares")
    (packed_round,), (separate_round,) = packed["round_loops"], separate["round_loops"]
    assert packed_round["warp_sums"] >= 1 and packed_round["shuffles"] < separate_round["shuffles"]
    assert packed_round["instructions"] < separate_round["instructions"]


def test_share_kernel_compacts_with_one_scan(families_output):
    """A wide bucket's strided slots lie in a thread as keys t, t + threads, ...: numbering the
    chosen column by column of that view takes one scan over the threads, where a prefix sum
    over the slots took a warp-wide scan per register (44 shuffles in the whole kernel at 8 keys
    a thread, 9 now)."""
    (share,) = _launches(families_output, "wide buckets fp32, k=1434 of 14336, 16 shares, counts sharing an int32")
    assert share["shuffles"] < 20
