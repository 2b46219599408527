"""Block-wide counts a bucket's threshold search waits on, simulated on the CPU.

The share kernel (``kernels/wide_bucket_topk.py``) finds each bucket's threshold for its share of
k by rounds of one block-wide count each; a call lasts as long as its slowest bucket. This
replays, in numpy, the integer arithmetic of the two searches on random normal buckets and counts
their rounds: ``kth_key_by_digits`` (two bits of the key a round, from the top) and
``kth_key_bracketed`` (between the least of the groups' largest keys and the largest, its span
cut in value for ``value_rounds`` rounds, then in key order; its first reduction counted as a
round). No GPU: the rounds, not their time.

    PYTHONPATH=. python -m benchmarks.simulate_threshold_rounds [--calls 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from topk_compiler.lowering.order_keys import order_keys

PAD = -(1 << 31)
# (rows x n, k, buckets) of the FFN shape at the bucket counts the planner offers at recall 0.95.
CASES = ((16, 14336, 1434, 16), (16, 14336, 1434, 8))


def float_of_key(key: int) -> np.float32:
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return np.array([bits], dtype=np.int64).astype(np.int32).view(np.float32)[0]


def key_of_float(value) -> int:
    return int(order_keys(torch.tensor([float(value)], dtype=torch.float32), largest=True)[0])


def digit_rounds(keys: np.ndarray, k: int) -> int:
    half, t, shift, at_or_above, rounds = 1 << 31, 0, 32, -1, 0
    while shift > 0 and at_or_above != k:
        shift -= 2
        rounds += 1
        counts = [(keys >= t + (j << shift) - half).sum() for j in range(4)]
        j = max(i for i in range(4) if counts[i] >= k)
        at_or_above = min(c for c in counts if c >= k)
        t += j << shift
    return rounds


def bracket_rounds(keys: np.ndarray, k: int, groups: int, value_rounds: int) -> int:
    tops = keys.reshape(len(keys) // groups, groups).max(0)
    lo, hi, at_or_above, rounds = int(tops.min()), int(tops.max()) + 1, -1, 1
    while (hi - lo > 1 or at_or_above < 0) and at_or_above != k:
        span = hi - lo
        points = [lo + span * j // 4 for j in range(4)]
        if rounds - 1 < value_rounds:
            low, high = float_of_key(lo), float_of_key(hi - 1)
            by_value = [lo] + [key_of_float(np.float32(low + (high - low) * np.float32(j * 0.25))) for j in (1, 2, 3)]
            if lo < by_value[1] <= by_value[2] <= by_value[3] < hi:
                points = by_value
        rounds += 1
        counts = [(keys >= p).sum() for p in points]
        above = [i for i in range(4) if counts[i] >= k]
        if not above:
            lo, hi = PAD, lo
            continue
        j = max(above)
        at_or_above = min(counts[i] for i in above)
        lo, hi = points[j], (hi if j == 3 else points[j + 1])
    return rounds


def simulate(calls: int) -> list[dict]:
    torch.manual_seed(0)
    out = []
    for rows, n, k, buckets in CASES:
        slots = -(-n // buckets)
        width = 1 << (slots - 1).bit_length()
        share = k // buckets
        groups = min(width, 1 << (share - 1).bit_length())
        searches = {"digits": lambda b: digit_rounds(b, share),
                    "bracket, key order": lambda b: bracket_rounds(b, share, groups, 0),
                    "bracket, 4 value rounds": lambda b: bracket_rounds(b, share, groups, 4)}
        rounds = {name: [] for name in searches}
        for _ in range(calls):
            for _ in range(rows):
                keys = order_keys(torch.randn(buckets, width), largest=True).numpy().astype(np.int64)
                keys[:, slots:] = PAD
                for name, search in searches.items():
                    rounds[name].append([search(bucket) for bucket in keys])
        for name, r in rounds.items():
            r = np.array(r)
            out.append({"shape": f"{rows}x{n} k={k}", "buckets": buckets, "search": name,
                        "mean_rounds": round(float(r.mean()), 2),
                        "slowest_bucket_of_a_call": round(float(r.reshape(calls, -1).max(1).mean()), 2)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40, help="calls simulated per case")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rows = simulate(args.calls)
    command = "PYTHONPATH=. python -m benchmarks.simulate_threshold_rounds " + " ".join(sys.argv[1:] if argv is None
                                                                                         else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulate_threshold_rounds.json").write_text(json.dumps(
        {"command": command, "machine": "CPU: rounds, not time", "torch": torch.__version__,
         "python": platform.python_version(), "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
