"""Compile our Triton kernels for a Hopper GPU on a machine without one, and report their
registers and spills.

The Triton interpreter (how CI runs every kernel) accepts code that the compiler rejects, such as
an integer literal that overflows int32, or returns of two types under a constexpr ``if``.
This catches those here, at no GPU time. Each launcher is called on small CPU tensors with its
kernels' launches intercepted: a launch's arguments become the kernel's signature (pointer
dtypes, 32-bit ints marked divisible by 16 where they are, as Triton specialises them), its
keyword constexprs and ``num_warps`` the compile options. ``triton.compile`` then runs down to a
cubin with the ptxas that ships with Triton; nothing is launched. Each launch reports its
registers, spills, shared memory, the instruction count of each loop that loads from global
memory (``load_loops``, from the disassembly), each loop that loads nothing (``round_loops``: a
threshold search's rounds), its instructions, block-wide barriers and warp shuffles (``waits``:
what a latency-bound program waits on), and its layout conversions (each a
round trip of a tensor through shared memory, or shuffles, between two ops that Triton gave
different register layouts, e.g. a vector load feeding a scattered store).

    PYTHONPATH=. python -m benchmarks.compile_check                 # every variant of the sweep
    PYTHONPATH=. python -m benchmarks.compile_check --shapes k=2048 --jobs 2
    PYTHONPATH=. python -m benchmarks.compile_check --families      # one call of each kernel family (CI)
    PYTHONPATH=. python -m benchmarks.compile_check --headline      # stage 1's loop at each headline plan
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.language import target_info

from topk_compiler.kernels.launch import LAUNCH_OPTIONS

HOPPER = GPUTarget("cuda", 90, 32)
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                    torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}


def _signature(fn: triton.JITFunction, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch of ``fn``."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        if i in fn.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs, options


@contextlib.contextmanager
def intercepted_launches(records: list):
    """Within the block, ``kernel[grid](...)`` of any JITFunction records the launch instead of running."""
    original = triton.JITFunction.__getitem__

    def getitem(fn, grid):
        def launch(*args, **kwargs):
            records.append((fn, args, kwargs))
        return launch

    triton.JITFunction.__getitem__ = getitem
    try:
        yield
    finally:
        triton.JITFunction.__getitem__ = original


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump's (shipped with Triton) output for a cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local memory (spills) of a cubin."""
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(cubin, "-res-usage")))
    return {"registers": int(usage["REG"]), "spills": int(usage["LOCAL"]) + int(usage["STACK"])}


def _instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of each instruction of a cubin's SASS."""
    return [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", _cuobjdump(cubin, "-sass"))]


def _loops(code: list[tuple[int, str]]) -> list[list[str]]:
    """The instructions of each loop: a backward branch and the code back to its target."""
    address = [a for a, _ in code]
    loops = []
    for i, (_, instruction) in enumerate(code):
        target = re.search(r"\bBRA\s+(?:`?\(?[^)]*\)?\s*)?0x([0-9a-f]+)", instruction)
        if target and int(target.group(1), 16) < address[i] and int(target.group(1), 16) in address:
            loops.append([ins for _, ins in code[address.index(int(target.group(1), 16)):i + 1]])
    return loops


def load_loops(code: list[tuple[int, str]]) -> list[int]:
    """Instructions in each loop that loads from global memory: the per-step cost of a streaming
    loop, readable without a GPU."""
    return [len(body) for body in _loops(code) if any(re.search(r"\bLDG\b", ins) for ins in body)]


def round_loops(code: list[tuple[int, str]]) -> list[dict]:
    """Each loop that loads nothing from global memory (a threshold search's rounds): its
    instructions, warp shuffles, block-wide barriers and warp sums (``REDUX``), one round's chain."""
    rounds = []
    for body in _loops(code):
        if not any(re.search(r"\bLDG\b", ins) for ins in body):
            opcodes = [_opcode(ins) for ins in body]
            rounds.append({"instructions": len(opcodes), "shuffles": sum(op.startswith("SHFL") for op in opcodes),
                           "barriers": sum(op.startswith("BAR") for op in opcodes),
                           "warp_sums": sum(op.startswith("REDUX") for op in opcodes)})
    return rounds


def _opcode(instruction: str) -> str:
    return instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]


def waits(code: list[tuple[int, str]]) -> dict:
    """Instructions, block-wide barriers (BAR) and warp shuffles (SHFL) in the code: the chain a
    latency-bound program waits on, counted statically (loops counted once)."""
    opcodes = [_opcode(ins) for _, ins in code]
    return {"instructions": len(opcodes), "barriers": sum(op.startswith("BAR") for op in opcodes),
            "shuffles": sum(op.startswith("SHFL") for op in opcodes)}


@contextlib.contextmanager
def _hopper_as_current_target():
    """Kernels that ask ``target_info`` for the GPU they compile for (``cuda_capability_geq``)
    get Hopper, as on the device; on this machine there is none to ask."""
    def hopper():
        return HOPPER

    hopper.__triton_builtin__ = True  # as the function it stands in for, for Triton's dependency hash
    saved = target_info.current_target
    target_info.current_target = hopper
    try:
        yield
    finally:
        target_info.current_target = saved


def compile_launch(fn, args, kwargs) -> dict:
    signature, constexprs, attrs, options = _signature(fn, args, kwargs)
    with _hopper_as_current_target():
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER, options=options)
    code = _instructions(kernel.asm["cubin"])
    return {"kernel": fn.__name__, **_resource_usage(kernel.asm["cubin"]), "shared_bytes": kernel.metadata.shared,
            "num_warps": options.get("num_warps", 4), "load_loops": load_loops(code), "round_loops": round_loops(code),
            **waits(code),
            "layout_conversions": kernel.asm["ttgir"].count("ttg.convert_layout")}


def launches_of(call) -> list:
    """The kernel launches ``call()`` makes (nothing runs)."""
    records = []
    with intercepted_launches(records):
        call()
    return records


def _variant_launches(rows, n, k, dname, v):
    from benchmarks.calibrate_cost_model import DTYPES, run_variant

    x = torch.empty(2, n, dtype=DTYPES[dname])
    return launches_of(lambda: run_variant(x, k, v))


def _check_variant(item):
    shape, v = item
    out = []
    try:
        for fn, args, kwargs in _variant_launches(*shape, v):
            out.append({**compile_launch(fn, args, kwargs)})
    except Exception as error:  # reported per variant
        out.append({"error": f"{type(error).__name__}: {str(error)[-600:]}"})
    return shape, v, out


def _bf16(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16)


def _chained(call):
    """``call`` with its launches chained as on a Hopper GPU (``kernels.chains_launches``)."""
    def run():
        from unittest import mock

        from topk_compiler.kernels import sparse_ffn, wide_bucket_topk

        with mock.patch.object(sparse_ffn, "chains_launches", lambda t: True), \
                mock.patch.object(wide_bucket_topk, "chains_launches", lambda t: True):
            return call()
    return run


def families() -> dict:
    """{name: (call of one launcher at a realistic size, whether its launches must not spill)}."""
    from topk_compiler.kernels.bucketed_topk import fused_bucketed_topk, split_bucketed_topk
    from topk_compiler.kernels.certified_topk import certified_topk
    from topk_compiler.kernels.filtered_topk import filtered_topk, split_filtered_topk
    from topk_compiler.kernels.gather_matmul import gather_matmul
    from topk_compiler.kernels.quantized_scores import quantized_scores
    from topk_compiler.kernels.select_topk import exact_topk
    from topk_compiler.kernels.sparse_ffn import lowrank_sparse_ffn_row, sparse_ffn
    from topk_compiler.kernels.wide_bucket_topk import wide_bucket_topk, wide_share_topk

    return {
        "fused, k=2048 of 32768, sorted in the program": (lambda: fused_bucketed_topk(
            _bf16(2, 32768), 2048, num_buckets=1024, per_bucket_k=4, largest=True, sorted=True, num_warps=8), True),
        "fused, k=2048 of 32768, unsorted": (lambda: fused_bucketed_topk(
            _bf16(2, 32768), 2048, num_buckets=1024, per_bucket_k=4, largest=True, sorted=False, num_warps=8), True),
        "fused, k=2048 of 32768, sorted, registers capped": (lambda: fused_bucketed_topk(
            _bf16(2, 32768), 2048, num_buckets=1024, per_bucket_k=4, largest=True, sorted=True, num_warps=8,
            max_registers=64), False),
        "fused fp32, k=100 of 65536, unsorted, bracketed and by digits": (lambda: [fused_bucketed_topk(
            torch.empty(2, 65536), 100, num_buckets=1024, per_bucket_k=1, largest=True, sorted=False, select=select,
            num_warps=4) for select in ("bracket", "digits")], True),
        "fused, k=64, bitonic, one warp": (lambda: fused_bucketed_topk(
            torch.empty(2, 8192, dtype=torch.float16), 64, num_buckets=256, per_bucket_k=1, largest=True,
            sorted=True, select="bitonic", num_warps=1), True),
        "fused fp32, k=1434 of 14336, rank sort": (lambda: fused_bucketed_topk(
            torch.empty(2, 14336), 1434, num_buckets=2048, per_bucket_k=2, largest=True, sorted=True,
            sort_with="rank", num_warps=8), True),
        "wide buckets fp32, k=1434 of 14336, 8 buckets of 180, chained": (_chained(lambda: wide_bucket_topk(
            torch.empty(2, 14336), 1434, num_buckets=8, per_bucket_k=180, largest=True)), True),
        "wide buckets bf16, k=2048 of 65536, 32 buckets of 68, shuffled": (lambda: wide_bucket_topk(
            _bf16(2, 65536), 2048, num_buckets=32, per_bucket_k=68, largest=False, layout_id=1, seed=3), True),
        "wide buckets fp32, k=1434 of 14336, 8 buckets of 180, bitonic network": (lambda: wide_bucket_topk(
            torch.empty(2, 14336), 1434, num_buckets=8, per_bucket_k=180, largest=True, select="bitonic"), True),
        "wide buckets bf16, k=2048 of 65536, 32 buckets of 68, bitonic network": (lambda: wide_bucket_topk(
            _bf16(2, 65536), 2048, num_buckets=32, per_bucket_k=68, largest=True, select="bitonic"), True),
        "wide buckets fp32, k=1434 of 14336, 8 shares": (lambda: wide_share_topk(
            torch.empty(2, 14336), 1434, num_buckets=8, largest=True), True),
        "wide buckets fp32, k=1434 of 14336, 16 shares, counts sharing an int32": (lambda: wide_share_topk(
            torch.empty(2, 14336), 1434, num_buckets=16, largest=True, num_warps=4), True),
        "wide buckets bf16, k=2048 of 65536, 32 shares, shuffled": (lambda: wide_share_topk(
            _bf16(2, 65536), 2048, num_buckets=32, largest=False, layout_id=1, seed=3), True),
        "wide buckets fp32, k=1434 of 14336, 16 shares, bracketed": (lambda: wide_share_topk(
            torch.empty(2, 14336), 1434, num_buckets=16, largest=True, num_warps=4, search="bracket"), True),
        "wide buckets bf16, k=2048 of 65536, 32 shares, bracketed": (lambda: wide_share_topk(
            _bf16(2, 65536), 2048, num_buckets=32, largest=True, search="bracket"), True),
        "split, radix, sort launch": (lambda: split_bucketed_topk(
            torch.empty(2, 65536), 256, num_buckets=1024, per_bucket_k=2, segments=8, largest=False, sorted=True,
            select="radix", sort_with="launch"), False),
        "certified exact, 256 x 128256-like fp32 k=50": (lambda: certified_topk(
            torch.empty(2, 128256), 50, num_buckets=1024, per_bucket_k=4, largest=True, sorted=True), False),
        "filtered exact": (lambda: filtered_topk(
            torch.empty(2, 16384), 100, num_buckets=512, per_bucket_k=1, largest=True, sorted=True), False),
        "split filtered exact, k=2048 of 32768 bf16, sorted": (lambda: split_filtered_topk(
            _bf16(2, 32768), 2048, num_buckets=1024, per_bucket_k=4, largest=True, sorted=True), True),
        "exact select in registers": (lambda: exact_topk(
            _bf16(2, 4096), 512, largest=True, sorted=True, select="bisect"), False),
        "sparse FFN, one row of 4096 x 16384": (lambda: sparse_ffn(
            _bf16(1, 4096), _bf16(16384, 4096), _bf16(16384), _bf16(16384, 4096), _bf16(4096), _bf16(1, 16384), 0.0,
            programs=132, expected=1862), True),
        "sparse FFN predicted in the kernel, one row of 4096 x 16384, rank 128, chained": (_chained(
            lambda: lowrank_sparse_ffn_row(_bf16(1, 4096), _bf16(4096, 128), _bf16(16384, 128), _bf16(16384, 4096),
                                           _bf16(16384), _bf16(16384, 4096), _bf16(4096), 0.0, programs=132)), True),
        "sparse FFN, several rows": (lambda: sparse_ffn(
            _bf16(8, 512), _bf16(2048, 512), None, _bf16(2048, 512), None, torch.empty(8, 2048), 0.0,
            programs=16, expected=300), False),
        "gather matmul": (lambda: gather_matmul(_bf16(4, 512), _bf16(4096, 512),
                                                torch.zeros(64, dtype=torch.int64)), False),
        "int8 scores": (lambda: quantized_scores(_bf16(1, 512), torch.zeros(1024, 512, dtype=torch.int8),
                                                 torch.ones(1024), None, bits=8, in_features=512), False),
    }


def check_families() -> int:
    """Compiles every launch of each family; the number of failures (errors, launches missing,
    spills where a family must have none)."""
    failures = 0
    for name, (call, spill_free) in families().items():
        try:
            launches = launches_of(call)
            results = [compile_launch(fn, args, kwargs) for fn, args, kwargs in launches]
            bad = not launches or (spill_free and any(r["spills"] for r in results))
        except Exception as error:  # reported per family
            results, bad = [{"error": f"{type(error).__name__}: {str(error)[-600:]}"}], True
        failures += bad
        print(f"{'FAIL' if bad else 'ok'}  {name}: {results or 'no launch'}", flush=True)
    return failures


# The fused plan each headline shape ran at recall 0.95 in benchmarks/results/bench_topk.json
# (rows, n, k, dtype, num_buckets, per_bucket_k, num_warps, select).
HEADLINE_PLANS = [(1024, 32768, 2048, torch.bfloat16, 1024, 4, 8, "bisect"),
                  (64, 131072, 2048, torch.bfloat16, 4096, 2, 16, "bisect"),
                  (4096, 4096, 512, torch.bfloat16, 256, 4, 2, "bisect"),
                  (256, 128256, 50, torch.float32, 1024, 1, 8, "bisect"),
                  (1024, 65536, 100, torch.float32, 1024, 1, 8, "bitonic"),
                  (16384, 8192, 64, torch.float16, 128, 2, 1, "bitonic"),
                  (16, 14336, 1434, torch.float32, 2048, 2, 8, "bisect")]


def check_headline_plans() -> None:
    """Stage 1's loops of each headline plan: instructions a step, and a step's elements a thread."""
    from topk_compiler.kernels.bucketed_topk import fused_bucketed_topk

    for rows, n, k, dtype, b, kb, warps, select in HEADLINE_PLANS:
        x = torch.empty(2, n, dtype=dtype)
        ((fn, args, kwargs),) = launches_of(lambda: fused_bucketed_topk(
            x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True, select=select, num_warps=warps))
        loops = compile_launch(fn, args, kwargs)["load_loops"]
        per_thread = b // (32 * warps) * kwargs["UNROLL"]
        print(f"{rows}x{n} k={k} {str(dtype).split('.')[-1]:<8} b={b} kb={kb} w={warps}: stage-1 loops "
              f"{loops} instructions a step of {per_thread} elements a thread "
              f"({', '.join(f'{size / per_thread:.1f}' for size in loops)} an element)", flush=True)


def main(argv=None) -> int:
    from benchmarks.calibrate_cost_model import DTYPES, HEADLINE, SPREAD, _describe, variants

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", metavar="PATTERN")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--families", action="store_true", help="one launcher call of each kernel family")
    parser.add_argument("--headline", action="store_true", help="stage 1's loop length at each headline plan")
    args = parser.parse_args(argv)
    if args.families:
        return 1 if check_families() else 0
    if args.headline:
        check_headline_plans()
        return 0
    items, seen = [], set()
    for shape in HEADLINE + SPREAD:
        name = f"{shape[0]}x{shape[1]} k={shape[2]} {shape[3]}"
        if args.shapes and not any(p in name for p in args.shapes):
            continue
        for v in variants(*shape[:3], DTYPES[shape[3]]):
            if v["kernel"] == "torch":
                continue
            key = (shape[1], shape[2], shape[3], _describe(v))
            if key not in seen:
                seen.add(key)
                items.append((shape, v))
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for shape, v, results in pool.map(_check_variant, items):
            for r in results:
                failures += "error" in r or r.get("spills", 0) > 0
                print(f"{shape[0]}x{shape[1]} k={shape[2]} {shape[3]:<5} {_describe(v):<64} {r}", flush=True)
    print(f"{len(items)} variants, {failures} with errors or spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
