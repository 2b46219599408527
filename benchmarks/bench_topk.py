"""Top-k side by side on one GPU, in one run: the HBM floor, torch.topk, torch.compile(torch.topk),
the paper's CUDA release (the "peer", optional), and our approx_topk at recall targets 0.9, 0.95,
0.99 and exact (recall_target=1.0).

For every shape and provider: median time and its 20th/80th percentiles (triton.testing.do_bench,
L2 flushed before every rep), the ratio to the HBM floor (input bytes read once / bandwidth), the
speed-up over torch.topk, the recall measured on the same outputs, and for ours the plan chosen
(kernel, num_buckets, per_bucket_k, segments) with the cost model's predicted time. Latency-bound
shapes (rows * n < 2**20) and the headline shapes are also timed as one call captured in a CUDA
graph and replayed (L2 flushed before each replay too), which takes Python dispatch out of the
time: where a kernel is shorter than the op's dispatch, the eager time is the dispatch's.

    PYTHONPATH=. python -m benchmarks.bench_topk --quick              # headline shapes only
    PYTHONPATH=. python -m benchmarks.bench_topk --jobs 16            # headline shapes + sweep (16 compiling processes)
    PYTHONPATH=. python -m benchmarks.bench_topk --peer .peer         # ... and the peer
    PYTHONPATH=. python -m benchmarks.bench_topk --smoke              # tiny shapes, runs on a CPU

The peer's checkout: its package and license, unpacked into the ignored ``.peer/`` (e.g. ``git
archive HEAD approx_topk LICENSE | tar -x -C .peer`` in a clone of
graphcore-research/pytorch-approx-topk) and carried to the GPU; ``benchmarks/peer_approx_topk.py``
builds its extension there (nvcc) while the other providers are measured.

Writes bench_topk.json (every number, with device, versions, date and command line) and, through
report_topk, bench_topk.md and bench_topk.png into --out; prints a short table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks import report_topk
from topk_compiler import approx_topk, expected_recall, measured_recall
from topk_compiler.lowering import device_timing
from topk_compiler.lowering.bucketed_topk import LATENCY_BOUND_ELEMENTS, lookup_tuned
from topk_compiler.lowering.plan import plan_topk, shortlist

QUANTILES = [0.5, 0.2, 0.8]
RECALL_TARGETS = (0.9, 0.95, 0.99)
OURS = (*(f"approx@{t}" for t in RECALL_TARGETS), "exact")
PROVIDERS = ("torch", "compiled", *OURS)
# Headline shapes also with sorted=False (a sparse-attention indexer needs the k, not their
# order; the peer's output is unsorted too): torch.topk's and ours at 0.95, each speed-up
# against torch.topk's unsorted call.
UNSORTED = ("torch:unsorted", "approx@0.95:unsorted")
# Every provider that runs our op (it records a plan and compiles its shortlist).
OUR_PROVIDERS = (*OURS, *UNSORTED[1:])
# Timed again as a replayed CUDA graph on latency-bound shapes (torch.topk too, so the speed-up
# under graphs compares like with like; a compiled graph is torch.compile's "reduce-overhead").
GRAPH_PROVIDERS = ("torch", *OURS, *UNSORTED)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Calls a batch of the back-to-back timing on the host's clock (the shortest of its batches).
BACK_TO_BACK_CALLS = 50

# The floor's bandwidth, unless --bandwidth gives one: the run's own device-to-device copy
# (bytes read + written per second; 3.0 TB/s on the H100 the issue quotes, ~4.3 on an H200), or
# this on a CPU.
CPU_BANDWIDTH = 2.0e10
# Sweep shapes whose input is larger than this are skipped (1024 x 1M fp32 is 4 GiB).
MAX_INPUT_BYTES = 2 * 1024**3
SWEEP_N = (1024, 4096, 16384, 65536, 262144, 1048576)
SWEEP_ROWS = (1, 64, 1024)
# k=256 first: a run cut short by the time budget still covers every (rows, n) once.
SWEEP_K = (256, 16, 2048)
SWEEP_DTYPE = "fp32"
# A long run stops starting shapes after this many seconds (the device runs one command for ~8 min).
DEFAULT_BUDGET_S = 420.0
# Of the budget, this much is kept for the peer's pass over the shapes measured first.
PEER_RESERVE_S = 90.0

# The peer's parameters: j = top items kept per bucket (its kernel takes 1..4; 3 is left out as
# its docs name {1, 2, 4}), k_mult = b * j / k (buckets relative to k), and one thread or one
# 64-thread block per bucket (its docs: "very important for performance ... try both").
PEER_RECALL = 0.95
PEER_J = (1, 2, 4)
PEER_K_MULTS = (1, 2, 4, 8, 16, 32, 64)
PEER_TRIES_PER_GROUP = 3
# Screening reps of the peer's settings are short; the fastest is then timed like every provider.
PEER_SCREEN_WARMUP_MS, PEER_SCREEN_REP_MS = 5, 20
# Timing on a CPU (--smoke without a GPU): plain wall-clock reps after one warm-up call.
CPU_REPS = 5


@dataclass(frozen=True)
class Shape:
    rows: int
    n: int
    k: int
    dtype: str
    group: str = "headline"

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.n} k={self.k} {self.dtype}"

    @property
    def input_bytes(self) -> int:
        return self.rows * self.n * DTYPES[self.dtype].itemsize


HEADLINE_SHAPES = (
    Shape(1024, 32768, 2048, "bf16"),
    Shape(64, 131072, 2048, "bf16"),
    Shape(4096, 4096, 512, "bf16"),
    Shape(256, 128256, 50, "fp32"),
    Shape(1024, 65536, 100, "fp32"),
    Shape(16384, 8192, 64, "fp16"),
    Shape(16, 14336, 1434, "fp32"),
)
SMOKE_SHAPES = (Shape(2, 1024, 16, "fp32", "smoke"), Shape(3, 4096, 64, "bf16", "smoke"))


@dataclass(frozen=True)
class PeerSetting:
    j: int
    k_mult: int
    multithread_buckets: bool

    def num_buckets(self, k: int) -> int:
        return k * self.k_mult // self.j

    def name(self, k: int) -> str:
        per_bucket = "block" if self.multithread_buckets else "thread"
        return f"j={self.j} k_mult={self.k_mult} (b={self.num_buckets(k)}), one {per_bucket} per bucket"


def sweep_shapes() -> list[Shape]:
    shapes = [Shape(rows, n, k, SWEEP_DTYPE, "sweep") for k in SWEEP_K for rows in SWEEP_ROWS for n in SWEEP_N]
    return [s for s in shapes if s.k < s.n and s.input_bytes <= MAX_INPUT_BYTES]


def select_shapes(quick: bool, smoke: bool, patterns: list[str] | None) -> list[Shape]:
    """Headline shapes first, then the sweep; ``patterns`` keeps shapes whose name contains any."""
    shapes = list(SMOKE_SHAPES) if smoke else list(HEADLINE_SHAPES) + ([] if quick else sweep_shapes())
    if patterns:
        shapes = [s for s in shapes if any(p in s.name for p in patterns)]
    return shapes


def hbm_floor_us(shape: Shape, bandwidth: float) -> float:
    """Time to read the input once at ``bandwidth`` bytes/s: no top-k can beat it."""
    return shape.input_bytes / bandwidth * 1e6


def peer_candidates(n: int, k: int) -> list[list[PeerSetting]]:
    """Per (j, one thread or block per bucket) the settings to try, fewest buckets first.

    A group starts at the smallest k_mult whose expected recall reaches PEER_RECALL (our recall
    model: the peer's interleaved buckets are ours, the first n mod b one longer) and holds at
    most PEER_TRIES_PER_GROUP. The peer needs k_mult * k <= n and j dividing k_mult * k.
    """
    groups = []
    for j in PEER_J:
        mults = [m for m in PEER_K_MULTS if k * m <= n and (k * m) % j == 0]
        first = next((i for i, m in enumerate(mults) if expected_recall(n, k, k * m // j, j) >= PEER_RECALL), None)
        chosen = [] if first is None else mults[first:first + PEER_TRIES_PER_GROUP]
        for multithread in (False, True):
            groups.append([PeerSetting(j, m, multithread) for m in chosen])
    return groups


def make_input(shape: Shape, device: torch.device) -> torch.Tensor:
    """Standard normal, seeded by the shape's name, so the peer's pass sees the same input."""
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(shape.name.encode()))
    return torch.randn(shape.rows, shape.n, generator=generator, device=device, dtype=DTYPES[shape.dtype])


def setup_topk(provider: str, x: torch.Tensor, k: int, peer=None):
    """A zero-argument call of ``provider`` on ``x``; ``peer`` is (peer's topk op, PeerSetting)."""
    if provider.endswith(":unsorted"):
        if provider == "torch:unsorted":
            return lambda: torch.topk(x, k, dim=-1, sorted=False)
        target = float(provider.removeprefix("approx@").removesuffix(":unsorted"))
        return lambda: approx_topk(x, k, recall_target=target, sorted=False)
    if provider == "torch":
        return lambda: torch.topk(x, k, dim=-1)
    if provider == "compiled":
        # Fresh and static per shape: no recompile limit, no automatic dynamic shapes.
        torch.compiler.reset()
        compiled = torch.compile(torch.topk, dynamic=False)
        return lambda: compiled(x, k, dim=-1)
    if provider == "exact":
        return lambda: approx_topk(x, k, recall_target=1.0)
    if provider.startswith("approx@"):
        target = float(provider.removeprefix("approx@"))
        return lambda: approx_topk(x, k, recall_target=target)
    if provider == "peer":
        peer_topk, setting = peer
        return lambda: peer_topk(x, k, -1, setting.j, setting.k_mult, True, setting.multithread_buckets)
    raise ValueError(f"unknown provider {provider!r}")


def target_of(provider: str) -> tuple[float, bool]:
    """(recall target, sorted) of one of our providers."""
    sorted_ = not provider.endswith(":unsorted")
    name = provider.removesuffix(":unsorted")
    return (1.0 if name == "exact" else float(name.removeprefix("approx@"))), sorted_


def providers_of(shape: Shape) -> tuple[str, ...]:
    return PROVIDERS + UNSORTED if shape.group == "headline" else PROVIDERS


def time_us(fn, device: torch.device, warmup_ms: int = 25, rep_ms: int = 100) -> dict:
    """Median, 20th and 80th percentile of ``fn``'s time in µs."""
    if device.type == "cuda":
        import triton.testing

        # do_bench clears L2 (writes a 256 MB buffer) before every rep, outside the timed span.
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES)
    else:
        fn()
        samples = []
        for _ in range(CPU_REPS):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        ms = [float(np.quantile(samples, q)) for q in QUANTILES]
    return {"median_us": ms[0] * 1e3, "p20_us": ms[1] * 1e3, "p80_us": ms[2] * 1e3}


def memory_of(fn, device: torch.device) -> dict:
    """Bytes one call allocates beyond its inputs at its peak, its outputs', and the rest
    (intermediates: candidate scratch, sort entries)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    outputs = sum(allocated_bytes(t) for t in out)
    return {"peak_bytes": peak, "output_bytes": outputs, "intermediate_bytes": peak - outputs}


# The CUDA caching allocator hands out blocks in multiples of 512 bytes, and its statistics count
# the blocks: 16 x 1434 fp32 values and int64 indices take 640 bytes more than their elements.
ALLOCATOR_BLOCK_BYTES = 512


def allocated_bytes(t: torch.Tensor) -> int:
    """Bytes the caching allocator counts for a tensor that owns its storage."""
    return -(-t.untyped_storage().nbytes() // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def graph_replay(fn):
    """Captures one call of ``fn`` in a CUDA graph and returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs the first call (compiles, caches) done already
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]


def plan_record(shape: Shape, provider: str, x: torch.Tensor) -> dict:
    """The plan approx_topk ran for this call: the one measured fastest at its first call on the
    GPU (the cost model's own choice under "model"), or the cost model's where nothing is timed;
    under "graph", the one its CUDA-graph replays ran where that differs."""
    target, sorted_ = target_of(provider)
    model = _plan(shape, target, str(x.device), sorted_)
    ran = lookup_tuned(shape.rows, shape.n, shape.k, x.dtype, str(x.device), True, sorted_, target)
    replayed = lookup_tuned(shape.rows, shape.n, shape.k, x.dtype, str(x.device), True, sorted_, target,
                            captured=True)
    record = {**dataclasses.asdict(ran or model), "model": dataclasses.asdict(model)}
    if replayed is not None and replayed != ran:
        record["graph"] = dataclasses.asdict(replayed)
    return record


def bench_provider(provider: str, x: torch.Tensor, shape: Shape, graphs: bool) -> dict:
    result = {}
    # A provider that fails is reported as failed; the other columns are still measured.
    try:
        fn = setup_topk(provider, x, shape.k)
        start = time.perf_counter()
        _, indices = fn()
        _sync(x.device)
        result["first_call_s"] = time.perf_counter() - start  # compiles included
        result["recall"] = measured_recall(x, indices, shape.k)
        result.update(time_us(fn, x.device))
        if provider in OUR_PROVIDERS:
            result["plan"] = plan_record(shape, provider, x)
            if x.is_cuda:
                result["memory"] = memory_of(fn, x.device)
    except Exception as error:
        result["error"] = _error(error)
        return result
    if graphs and provider in GRAPH_PROVIDERS:
        if x.is_cuda:
            # do_bench's events bracket each call after an L2 flush that the host can run ahead
            # of, so its eager time leaves out much of a short call's dispatch; calls back to
            # back on the host's clock pay it (``device_timing.eager_time_us``, as our first
            # calls time their plans).
            result["back_to_back_us"] = device_timing.eager_time_us(fn, replays=BACK_TO_BACK_CALLS)
        try:
            result["graph"] = time_us(graph_replay(fn), x.device)
        except Exception as error:
            result["graph"] = {"error": _error(error)}
    return result


def bench_shape(shape: Shape, device: torch.device, bandwidth: float) -> dict:
    x = make_input(shape, device)
    graphs = device.type == "cuda" and (shape.rows * shape.n < LATENCY_BOUND_ELEMENTS or shape.group == "headline")
    return {
        "shape": {**dataclasses.asdict(shape), "name": shape.name},
        "input_bytes": shape.input_bytes,
        "floor_us": hbm_floor_us(shape, bandwidth),
        "cuda_graphs": graphs,
        "results": {p: bench_provider(p, x, shape, graphs) for p in providers_of(shape)},
    }


def bench_peer(peer_topk, x: torch.Tensor, shape: Shape) -> dict:
    """The peer's fastest setting (of those tried) whose measured recall reaches PEER_RECALL."""
    k = shape.k
    tried, passing = [], []
    for group in peer_candidates(shape.n, k):
        timed = 0
        for setting in group:
            entry = {"setting": setting.name(k), **dataclasses.asdict(setting), "num_buckets": setting.num_buckets(k)}
            tried.append(entry)
            try:
                fn = setup_topk("peer", x, k, peer=(peer_topk, setting))
                _, indices = fn()
                entry["recall"] = measured_recall(x, indices, k)
                if entry["recall"] >= PEER_RECALL:
                    entry["screen"] = time_us(fn, x.device, PEER_SCREEN_WARMUP_MS, PEER_SCREEN_REP_MS)
                    passing.append((entry["screen"]["median_us"], setting))
                    timed += 1
            except Exception as error:
                entry["error"] = _error(error)
                break
            if timed == 2:  # keeps the search short: past these, more buckets mostly grow stage 2
                break
    if not passing:
        return {"error": f"no setting tried reached measured recall {PEER_RECALL}", "tried": tried}
    _, best = min(passing, key=lambda p: p[0])
    try:
        fn = setup_topk("peer", x, k, peer=(peer_topk, best))
        _, indices = fn()
        result = {"setting": best.name(k), "params": {**dataclasses.asdict(best), "num_buckets": best.num_buckets(k)},
                  "recall": measured_recall(x, indices, k), **time_us(fn, x.device)}
    except Exception as error:
        result = {"error": _error(error)}
    result["tried"] = tried
    return result


def peer_pass(report: dict, shapes: dict[str, Shape], checkout: Path, build, device, deadline: float) -> None:
    """Adds the peer's column to every measured shape, in the order they were measured."""
    info = report["peer"] = {"checkout": str(checkout), "error": None}
    error = build if isinstance(build, str) else None
    if error is None:
        error = build.wait(deadline - time.perf_counter())
        info["build"] = build.last_line()
    if error is None:
        try:
            peer_topk = importlib.import_module("benchmarks.peer_approx_topk").load(checkout)
        except Exception as load_error:
            error = _error(load_error)
    info["error"] = error
    for record in report["shapes"]:
        if "results" not in record:
            continue
        if error is not None:
            record["results"]["peer"] = {"error": "peer unavailable (see the peer section)"}
        elif time.perf_counter() > deadline:
            record["results"]["peer"] = {"error": "skipped: time budget"}
        else:
            shape = shapes[record["shape"]["name"]]
            record["results"]["peer"] = bench_peer(peer_topk, make_input(shape, device), shape)
            torch.cuda.empty_cache()


def start_peer_build(checkout: Path | None, device: torch.device):
    """The peer's background build, or a string saying why there is none."""
    if device.type != "cuda":
        return "the peer is a CUDA extension: no CUDA device here"
    try:
        return importlib.import_module("benchmarks.peer_approx_topk").BackgroundBuild(checkout)
    except Exception as error:  # not a checkout, or the build could not start
        return _error(error)


def measure_copy(device: torch.device, nbytes: int) -> dict:
    """Device-to-device copy of ``nbytes``: the bandwidth a streaming kernel can actually reach."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_us(lambda: dst.copy_(src), device)
    seconds = timing["median_us"] * 1e-6
    return {"bytes": nbytes, **timing, "read_bytes_per_s": nbytes / seconds,
            "read_write_bytes_per_s": 2 * nbytes / seconds}


def add_ratios(record: dict) -> None:
    """×floor and speed-up over torch.topk (eager; graph replay against torch.topk's replay), the
    unsorted calls' over torch.topk's unsorted one."""
    results = record["results"]
    for provider, result in results.items():
        baseline = results.get("torch:unsorted" if provider.endswith(":unsorted") else "torch", {})
        torch_us = baseline.get("median_us")
        torch_graph_us = baseline.get("graph", {}).get("median_us")
        if "median_us" not in result:
            continue
        result["x_floor"] = result["median_us"] / record["floor_us"]
        if torch_us:
            result["speedup"] = torch_us / result["median_us"]
        if "predicted_us" in result.get("plan", {}):
            result["measured_over_predicted"] = result["median_us"] / result["plan"]["predicted_us"]
        graph = result.get("graph", {})
        if "median_us" in graph and torch_graph_us:
            graph["speedup"] = torch_graph_us / graph["median_us"]


def environment(device: torch.device, bandwidth: float) -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "bandwidth_bytes_per_s": bandwidth,
        "quantiles": QUANTILES,
        "timer": "triton.testing.do_bench (L2 flushed per rep)" if device.type == "cuda" else "time.perf_counter",
    }


def _plan(shape: Shape, target: float, device: str, sorted_: bool = True):
    return plan_topk(shape.rows, shape.n, shape.k, DTYPES[shape.dtype], device, target, "interleaved", sorted_,
                     None, None, "auto")


def _compile_worker(tasks: list[tuple[Shape, bool, object]]) -> int:
    """Runs each (shape, plan) on two rows of the shape's length: Triton specialises on the same
    argument properties, so this fills its on-disk kernel cache and the first calls of the
    timing pass only time."""
    from topk_compiler.lowering.bucketed_topk import _run

    compiled, inputs = 0, {}
    for shape, sorted_, plan in tasks:
        key = (shape.n, shape.dtype)
        if key not in inputs:
            inputs[key] = torch.randn(2, shape.n, device="cuda").to(DTYPES[shape.dtype])
        try:
            _run(inputs[key], shape.k, True, sorted_, plan, "interleaved", 0)
            compiled += 1
        except Exception:  # the timing pass reports it, with context
            pass
    torch.cuda.synchronize()
    return compiled


def compile_tasks(shapes: list[Shape]) -> list[tuple[Shape, bool, object]]:
    """(shape, sorted, plan) for every distinct plan our providers may time (``plan.shortlist``)."""
    tasks, seen = [], set()
    for shape in shapes:
        for provider in providers_of(shape):
            if provider not in OUR_PROVIDERS:
                continue
            target, sorted_ = target_of(provider)
            approx, exact = shortlist(shape.rows, shape.n, shape.k, DTYPES[shape.dtype], "cuda", target,
                                      sorted=sorted_)
            for plan in (*approx, *exact):
                key = (shape.name, sorted_, repr(plan))
                if key not in seen:
                    seen.add(key)
                    tasks.append((shape, sorted_, plan))
    return tasks


def precompile(shapes: list[Shape], jobs: int) -> None:
    """Compiles the plans of ``shapes`` in ``jobs`` processes, dealt out plan by plan (a shape's
    plans compile one after another in one process otherwise: 146 s for 7 shapes with 14 jobs)."""
    import concurrent.futures
    import multiprocessing

    start = time.perf_counter()
    tasks = compile_tasks(shapes)
    chunks = [tasks[i::jobs] for i in range(jobs)]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = sum(pool.map(_compile_worker, [c for c in chunks if c]))
    print(f"precompiled {compiled} of {len(tasks)} plans in {time.perf_counter() - start:.0f} s with {jobs} jobs",
          flush=True)


def _write_json(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(report, indent=1))


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = select_shapes(args.quick, args.smoke, args.shapes)
    build = start_peer_build(args.peer, device) if args.peer else None
    if device.type == "cuda" and args.jobs > 1:
        precompile(shapes, args.jobs)
    deadline = started + args.budget_s
    main_deadline = deadline - (PEER_RESERVE_S if args.peer else 0.0)
    build_wait_s = None
    if args.peer and not isinstance(build, str):
        # A compiler running beside the timings slows the host's dispatch of every eager call.
        waited = time.perf_counter()
        build = build.wait(main_deadline - waited) or build
        build_wait_s = time.perf_counter() - waited
    copy = measure_copy(device, 2**30 if device.type == "cuda" else 2**24)
    bandwidth = args.bandwidth or (copy["read_write_bytes_per_s"] if device.type == "cuda" else CPU_BANDWIDTH)
    report = {"environment": environment(device, bandwidth), "copy": copy, "shapes": []}
    print(f"{report['environment']['device']}: {len(shapes)} shapes, floor at {bandwidth / 1e12:.2f} TB/s", flush=True)
    for shape in shapes:
        if time.perf_counter() > main_deadline:
            report["shapes"].append({"shape": {**dataclasses.asdict(shape), "name": shape.name},
                                     "skipped": "time budget"})
            continue
        record = bench_shape(shape, device, bandwidth)
        report["shapes"].append(record)
        # A run cut short (a device call's time limit) keeps the shapes measured so far.
        _write_json(report, args.out, "bench_topk.partial.json")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ours = record["results"]["approx@0.95"]
        print(f"[{time.perf_counter() - started:4.0f} s] {shape.name}: torch.topk "
              f"{record['results']['torch'].get('median_us', float('nan')):.1f} us, ours@0.95 "
              f"{ours.get('median_us', float('nan')):.1f} us", flush=True)
    if args.peer:
        peer_pass(report, {s.name: s for s in shapes}, args.peer, build, device, deadline)
        report["peer"]["build_wait_s"] = build_wait_s
    for record in report["shapes"]:
        if "results" in record:
            add_ratios(record)
    report["wall_s"] = time.perf_counter() - started
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="headline shapes only")
    parser.add_argument("--smoke", action="store_true", help="two tiny shapes (runs on a CPU)")
    parser.add_argument("--shapes", nargs="+", metavar="PATTERN",
                        help='keep shapes whose name contains any PATTERN, e.g. "k=2048" "1024x"')
    parser.add_argument("--peer", type=Path, metavar="PATH", help="checkout of graphcore-research/pytorch-approx-topk")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results"))
    parser.add_argument("--jobs", type=int, default=1, help="processes compiling our kernels before timing")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="bytes/s of the HBM floor (default: the measured device-to-device copy)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="stop starting new shapes after this many seconds (skipped ones are recorded)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    _write_json(report, args.out, "bench_topk.json")
    (args.out / "bench_topk.partial.json").unlink(missing_ok=True)
    report_topk.write_report(report, args.out)
    print(report_topk.short_table(report), flush=True)
    return report


if __name__ == "__main__":
    main()
