"""``calibrate()``: measure HiRE predictor recall on the user's data and choose each site's
predictor, rank and k'.

The model is traced by Dynamo exactly as the backend would see it; every HiRE site the passes
can rewrite gets a probe that records the rows reaching it, and the graphs run eagerly (nothing
is rewritten, nothing is compiled by Inductor). Then, per site and per predictor option (low-rank
of each rank in ``ranks``, int8, int4):

* logits: the predicted rank of each element of the exact top-k gives, for every k', the recall
  ``|top-k' predicted  &  top-k exact| / k`` averaged over rows, so the smallest k' meeting the
  target is exact for these rows;
* FFN: sorting all rows' predicted pre-activations gives, for every threshold t, the activation
  mass of the neurons predicted above t, ``sum_{j: p_j > t} |act_j| / sum_j |act_j|`` averaged
  over rows (a truly inactive ReLU neuron weighs 0), so the largest t meeting the target is exact
  for these rows; the entry's ``candidates`` is the mean number of neurons a row then computes.
  Where a dropped neuron still contributes (GELU: its small negative outputs add up over the
  many dropped neurons, coherently, through W2), mass recall does not bound the output's error:
  on all-MiniLM-L6-v2 a rank-8 predictor met mass recall 0.95 with relative output errors of
  0.41-0.55. There the threshold is also lowered until the relative output error,
  ``|FFN restricted - FFN| / |FFN - b2|`` over up to 1024 rows spread over the site's (norms of
  all of them together), is at most ``1 - recall_target``, and the option cheapest with its own
  such threshold wins; the entry reports ``output_error``.

Among the options the HiRE cost model's cheapest at the site's batch size (``rows_per_call``, by
default the one observed) wins. The
choice is then measured with the real predictor (in the weight's dtype): an FFN threshold is
recomputed with it; a logits k' is checked with the op's own candidate selection (bucketed where
that is faster) and raised until the measured recall meets the target. That recall is what the
entry reports. Sites at one source line (a loop over layers) share one entry, which meets the
target at each of them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from topk_compiler.config import ApproxTopkConfig, check_recall_target
from topk_compiler.lowering import hire_cost_model
from topk_compiler.lowering.hire_candidates import select_candidates
from topk_compiler.lowering.hire_ffn import activation_fn
from topk_compiler.lowering.hire_predictor import PREDICTOR_KINDS, predictor_for, right_singular_vectors
from topk_compiler.passes.base import source_location
from topk_compiler.passes.hire_ffn import ffn_site_facts, ffn_sites
from topk_compiler.passes.hire_logits import logits_site_facts, match_logits_site

logger = logging.getLogger("topk_compiler")

# Ranks tried for low-rank predictors (those below min(n, d)).
DEFAULT_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
# Rows scored at a time while measuring (bounds the [rows, n] temporaries).
_CHUNK_ROWS = 256
# Growth of k' per step while the check with the real predictor misses the target.
_RAISE_FACTOR = 1.1
_MAX_RAISES = 40


@dataclass
class _Site:
    """One probed site: its weights, its kind and the rows of x that reached it."""

    location: str
    kind: str                      # "logits" or "ffn"
    weight: torch.Tensor           # W (logits) or W1 (FFN)
    bias: torch.Tensor | None
    k: int = 0                     # logits
    largest: bool = True           # logits
    activation: str = "relu"       # FFN
    w2: torch.Tensor | None = None  # FFN
    rows: list[torch.Tensor] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    max_rows: int = 4096

    def record(self, x: torch.Tensor) -> None:
        x2d = x.detach().reshape(-1, x.shape[-1])
        self.calls.append(x2d.shape[0])
        have = sum(r.shape[0] for r in self.rows)
        if have < self.max_rows:
            self.rows.append(x2d[: self.max_rows - have].clone())


def _as_call(sample: Any) -> tuple[tuple, dict]:
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, Mapping):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    raise TypeError(f"calibrate: each sample must be a Tensor, a tuple of arguments or a dict of keyword "
                    f"arguments, got {type(sample).__name__}")


def _probe_sites(model, samples: list, config: ApproxTopkConfig, max_rows: int) -> list[_Site]:
    sites: list[_Site] = []

    def probing_backend(gm: torch.fx.GraphModule, example_inputs):
        graph = gm.graph
        for node in list(graph.nodes):
            site = match_logits_site(node)
            if site is None:
                continue
            facts = logits_site_facts(gm, site, example_inputs)
            location, _ = source_location(node)
            if isinstance(facts, str) or location is None:
                continue
            probe = _Site(location, "logits", facts.weight, facts.bias, k=facts.k, largest=facts.largest,
                          max_rows=max_rows)
            sites.append(probe)
            with graph.inserting_before(site.linear.output):
                graph.call_function(probe.record, (site.linear.x,))
        for up, act, down in ffn_sites(graph):
            facts = ffn_site_facts(gm, up, act, down, example_inputs, config.hire.ffn_activations)
            location, _ = source_location(down.output)
            if isinstance(facts, str) or location is None:
                continue
            probe = _Site(location, "ffn", facts.w1, facts.b1, activation=facts.activation, w2=facts.w2,
                          max_rows=max_rows)
            sites.append(probe)
            with graph.inserting_before(up.output):
                graph.call_function(probe.record, (up.x,))
        gm.recompile()
        return gm.forward

    compiled = torch.compile(model, backend=probing_backend)
    with torch.no_grad():
        for sample in samples:
            args, kwargs = _as_call(sample)
            compiled(*args, **kwargs)
    return [s for s in sites if s.rows]


def _predictor_options(weight: torch.Tensor, predictors, ranks):
    """(kind, rank) options for ``weight``."""
    options = []
    for kind in predictors:
        if kind == "lowrank":
            options += [("lowrank", r) for r in ranks if r < min(weight.shape)]
        else:
            options.append((kind, 0))
    return options


def _option_scores(site: _Site, options) -> dict:
    """{(kind, rank): function(rows) -> fp32 predicted scores (bias included)}. Low-rank options
    share one eigendecomposition; the chosen option is re-measured with the real predictor."""
    w = site.weight.detach()
    scorers = {}
    lowrank = [r for kind, r in options if kind == "lowrank"]
    if lowrank:
        a = right_singular_vectors(w, max(lowrank))
        b = w.to(torch.float32) @ a
        for r in lowrank:
            scorers[("lowrank", r)] = (lambda xs, r=r: (xs.to(torch.float32) @ a[:, :r]) @ b[:, :r].T)
    for kind, _ in options:
        if kind != "lowrank":
            predictor = predictor_for(w, kind)
            scorers[(kind, 0)] = (lambda xs, p=predictor: p.scores(xs.to(w.dtype)).to(torch.float32))
    bias = None if site.bias is None else site.bias.detach().to(torch.float32)
    return {key: (lambda xs, f=f: f(xs) + bias if bias is not None else f(xs)) for key, f in scorers.items()}


def _real_scorer(site: _Site, kind: str, rank: int):
    predictor = predictor_for(site.weight.detach(), kind, rank)
    bias = None if site.bias is None else site.bias.detach()
    return lambda xs: predictor.scores(xs.to(site.weight.dtype), bias).to(torch.float32)


def _exact(site: _Site, xs: torch.Tensor) -> torch.Tensor:
    w = site.weight.detach()
    return torch.nn.functional.linear(xs.to(w.dtype), w, None if site.bias is None else site.bias.detach()).float()


def _logits_candidates(site: _Site, x: torch.Tensor, scorers: dict, recall_target: float) -> dict:
    """{option: smallest k' whose mean recall of the exact top-k over the rows of x meets the target}."""
    n = site.weight.shape[0]
    positions = {key: [] for key in scorers}
    for xs in x.split(_CHUNK_ROWS):
        truth = _exact(site, xs).topk(site.k, dim=1, largest=site.largest).indices
        for key, score in scorers.items():
            order = score(xs).argsort(dim=1, descending=site.largest)
            rank_of = torch.empty_like(order)
            rank_of.scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
            positions[key].append(rank_of.gather(1, truth).reshape(-1))
    needed = {}
    for key, pos in positions.items():
        pos = torch.cat(pos).sort().values
        q = max(0, math.ceil(recall_target * pos.numel() - 1e-9) - 1)
        needed[key] = max(site.k, int(pos[q]) + 1)
    return needed


def logits_recall(site: _Site, x: torch.Tensor, kind: str, rank: int, candidates: int) -> float:
    """Mean recall over the rows of x of the real predictor and the op's candidate selection."""
    score = _real_scorer(site, kind, rank)
    total = 0.0
    for xs in x.split(_CHUNK_ROWS):
        truth = _exact(site, xs).topk(site.k, dim=1, largest=site.largest).indices
        if candidates >= site.weight.shape[0]:
            total += xs.shape[0]
            continue
        _, chosen = select_candidates(score(xs), candidates, site.largest)
        total += (chosen[:, :, None] == truth[:, None, :]).any(dim=1).to(torch.float64).mean(dim=1).sum().item()
    return total / x.shape[0]


@dataclass
class _ThresholdCurve:
    """Mean activation-mass recall of "neurons predicted above t" over the rows of one site, for
    every t: the predicted scores of all rows sorted (descending) and the running recall."""

    values: torch.Tensor   # sorted predicted pre-activations, all rows together
    recall: torch.Tensor   # recall when every neuron up to this position is kept (float64)
    base: float            # recall when none is kept (rows without any activation count fully)
    rows: int

    def threshold_for(self, target: float) -> float:
        i = int(torch.searchsorted(self.recall, torch.tensor([target - 1e-9], dtype=torch.float64,
                                                             device=self.recall.device)))
        if i >= self.values.numel() - 1:
            return float(self.values[-1]) - 1.0
        return float((self.values[i] + self.values[i + 1]) / 2)

    def recall_at(self, threshold: float) -> float:
        kept = int((self.values > threshold).sum())
        return float(self.recall[kept - 1]) if kept else self.base

    def neurons_at(self, threshold: float) -> float:
        return int((self.values > threshold).sum()) / self.rows


def _ffn_curve(site: _Site, x: torch.Tensor, score) -> _ThresholdCurve:
    values, weights = [], []
    inactive_rows = 0
    for xs in x.split(_CHUNK_ROWS):
        mass = activation_fn(site.activation)(_exact(site, xs)).abs()
        total = mass.sum(dim=1, keepdim=True)
        inactive_rows += int((total == 0).sum())
        weights.append(torch.where(total > 0, mass / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0).reshape(-1))
        values.append(score(xs).reshape(-1))
    values, order = torch.cat(values).sort(descending=True)
    base = inactive_rows / x.shape[0]
    recall = torch.cat(weights)[order].to(torch.float64).cumsum(0) / x.shape[0] + base
    return _ThresholdCurve(values, recall, base, x.shape[0])


# Activations whose dropped neurons contribute exactly 0 when inactive (mass recall bounds the error).
_ZERO_WHEN_INACTIVE = ("relu", "relu_squared")
# Rows per site the output error is measured on, spread evenly over the site's rows (their
# activations and predictions are kept while the threshold is searched: at most 2**23 values of
# each). On all-MiniLM-L6-v2 the first 256 rows (a few paragraphs) were not enough: a rank-8
# predictor met the bound 0.1 on them and had 0.17 on other text.
_ERROR_ROWS = 1024
_ERROR_VALUES = 2**23


class _ErrorProbe:
    """Relative output error, |FFN restricted - FFN| / |FFN - b2| over a sample of rows together
    (Frobenius norms: rows with large outputs weigh more), of one site's FFN computed over the
    neurons predicted above a threshold; the rows are spread over the site's rows. The exact
    activations are computed once per site, each predictor's scores once per predictor."""

    def __init__(self, site: _Site, x: torch.Tensor):
        rows = max(1, min(_ERROR_ROWS, _ERROR_VALUES // site.weight.shape[0]))
        self.xs = x[:: max(1, x.shape[0] // rows)][:rows]
        self.act = activation_fn(site.activation)(_exact(site, self.xs))
        self.w2 = site.w2.detach().to(torch.float32)
        self.full = float((self.act @ self.w2.T).norm()) or torch.finfo(torch.float32).tiny

    def error(self, scores: torch.Tensor, threshold: float) -> float:
        return float((self.act.masked_fill(scores > threshold, 0.0) @ self.w2.T).norm()) / self.full


def _error_threshold(probes, scores, curves, bound: float, start: float) -> float:
    """The largest threshold <= ``start`` (the mass-recall one) at which every site's output
    error (``probes``, with the predictor's ``scores`` of their rows) is at most ``bound``: a
    bisection over the sorted predicted pre-activations."""
    values = torch.cat([curve.values for curve in curves]).sort(descending=True).values

    def threshold(i):  # keeps the neurons predicted above values[i]; past the end, all of them
        return float(values[i]) if i < values.numel() else float(values[-1]) - 1.0

    def ok(t):
        return all(probe.error(s, t) <= bound for probe, s in zip(probes, scores))

    if ok(start):
        return start
    lo, hi = int((values > start).sum()), values.numel()  # ok fails at lo, holds at hi (error 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(threshold(mid)):
            hi = mid
        else:
            lo = mid
    return threshold(hi)


def _site_cost(site: _Site, rows: int, kind: str, rank: int, candidates: int) -> float:
    w = site.weight
    device, dtype = str(w.device), w.dtype
    if site.kind == "logits":
        return hire_cost_model.hire_logits_cost(rows, w.shape[1], w.shape[0], site.k, candidates, kind, rank,
                                                dtype, device).seconds
    return hire_cost_model.hire_ffn_cost(rows, w.shape[1], w.shape[0], site.w2.shape[0], candidates, kind, rank,
                                         dtype, device).seconds


def _rows_per_call(site: _Site, rows_per_call: int | None) -> int:
    return rows_per_call or max(1, int(torch.tensor(site.calls).median()))


def _calibrate_logits(group, xs, options, recall_target, rows_per_call) -> dict:
    needed = [_logits_candidates(site, x, _option_scores(site, options), recall_target) for site, x in zip(group, xs)]
    best = None
    for option in options:
        kc = max(need[option] for need in needed)
        cost = sum(_site_cost(site, _rows_per_call(site, rows_per_call), *option, kc) for site in group)
        if best is None or cost < best[0]:
            best = (cost, option, kc)
    _, (kind, rank), kc = best
    n = group[0].weight.shape[0]
    recall = min(logits_recall(site, x, kind, rank, kc) for site, x in zip(group, xs))
    raises = 0
    while recall < recall_target and kc < n and raises < _MAX_RAISES:
        kc = min(n, max(kc + 1, math.ceil(kc * _RAISE_FACTOR)))
        recall = min(logits_recall(site, x, kind, rank, kc) for site, x in zip(group, xs))
        raises += 1
    return {"predictor": kind, "rank": rank, "candidates": kc, "recall": recall}


def _shared_threshold(curves, recall_target) -> tuple[float, int, float]:
    """(threshold meeting the target at every site, mean neurons per row at the busiest, worst recall)."""
    threshold = min(curve.threshold_for(recall_target) for curve in curves)
    neurons = max(math.ceil(curve.neurons_at(threshold)) for curve in curves)
    return threshold, max(1, neurons), min(curve.recall_at(threshold) for curve in curves)


def _ffn_choice(group, xs, scores, recall_target, bound, probes):
    """(threshold, neurons per row at the busiest site, worst recall, worst output error or None)
    of one predictor: the mass-recall threshold, lowered where there is an output-error ``bound``
    until each site's error probe meets it."""
    curves = [_ffn_curve(site, x, score) for site, x, score in zip(group, xs, scores)]
    threshold, neurons, recall = _shared_threshold(curves, recall_target)
    if bound is None:
        return threshold, neurons, recall, None
    sampled = [score(probe.xs) for probe, score in zip(probes, scores)]
    threshold = _error_threshold(probes, sampled, curves, bound, threshold)
    neurons = max(1, max(math.ceil(curve.neurons_at(threshold)) for curve in curves))
    recall = min(curve.recall_at(threshold) for curve in curves)
    return threshold, neurons, recall, max(probe.error(s, threshold) for probe, s in zip(probes, sampled))


def _calibrate_ffn(group, xs, options, recall_target, rows_per_call) -> dict:
    bound, probes = None, None
    if group[0].activation not in _ZERO_WHEN_INACTIVE:
        bound, probes = 1.0 - recall_target, [_ErrorProbe(site, x) for site, x in zip(group, xs)]
    scorers = [_option_scores(site, options) for site in group]
    best = None
    for option in options:
        _, neurons, _, _ = _ffn_choice(group, xs, [score[option] for score in scorers], recall_target, bound,
                                       probes)
        cost = sum(_site_cost(site, _rows_per_call(site, rows_per_call), *option, neurons) for site in group)
        if best is None or cost < best[0]:
            best = (cost, option)
    kind, rank = best[1]
    real = [_real_scorer(site, kind, rank) for site in group]
    threshold, neurons, recall, error = _ffn_choice(group, xs, real, recall_target, bound, probes)
    entry = {"predictor": kind, "rank": rank, "candidates": neurons, "threshold": threshold, "recall": recall}
    if error is not None:
        entry["output_error"] = round(error, 6)
    return entry


def _site_keys(locations: Iterable[str]) -> dict[str, str]:
    """{location: key}: "file.py:LINE" where that is unambiguous, else the full location."""
    locations = sorted(set(locations))
    short = {loc: f"{os.path.basename(loc.rsplit(':', 1)[0])}:{loc.rsplit(':', 1)[1]}" for loc in locations}
    counts: dict[str, int] = {}
    for key in short.values():
        counts[key] = counts.get(key, 0) + 1
    return {loc: short[loc] if counts[short[loc]] == 1 else loc for loc in locations}


def calibrate(model, sample_inputs: Iterable, recall_target: float = 0.95, *,
              predictors: Iterable[str] = PREDICTOR_KINDS, ranks: Iterable[int] = DEFAULT_RANKS,
              max_rows: int = 4096, rows_per_call: int | None = None, **options) -> dict[str, Any]:
    """Measure HiRE recall at every site of ``model`` on ``sample_inputs``; return the options for
    ``torch.compile(model, backend="approx_topk", options=...)``.

    ``sample_inputs``: an iterable of calls (a Tensor, a tuple of arguments, or a dict of keyword
    arguments), run eagerly under ``torch.no_grad()``. ``recall_target``: the mean recall each
    site must reach on these rows (see the module docstring for what recall means at each kind of
    site). ``predictors``, ``ranks``: the options tried. ``max_rows``: rows kept per site.
    ``rows_per_call``: the batch size the choice is made cheapest for (by default the median rows
    per call seen at the site; set 1 to calibrate on long sequences for token-by-token decoding).
    ``options``: further backend options (as for torch.compile), kept in the result; they also
    decide which sites exist (e.g. ``hire={"ffn_activations": ["relu", "gelu"]}``).

    The result is ``options`` plus ``recall_target`` and ``hire.calibration``: per site
    ``"file.py:LINE" -> {predictor, rank, candidates, [threshold,] recall_target, recall, rows}``,
    where ``recall`` is measured on the sample rows with the real predictor and selection.
    """
    recall_target = check_recall_target(recall_target)
    predictors = tuple(predictors)
    bad = [p for p in predictors if p not in PREDICTOR_KINDS]
    if bad or not predictors:
        raise ValueError(f"calibrate: predictors must be a non-empty subset of {PREDICTOR_KINDS}, got {predictors!r}")
    ranks = tuple(sorted(set(ranks)))
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"calibrate: ranks must be positive ints, got {ranks!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"calibrate: max_rows must be a positive int, got {max_rows!r}")
    if rows_per_call is not None and (isinstance(rows_per_call, bool) or not isinstance(rows_per_call, int)
                                      or rows_per_call < 1):
        raise ValueError(f"calibrate: rows_per_call must be a positive int or None, got {rows_per_call!r}")
    merged = {**options, "recall_target": recall_target}
    config = ApproxTopkConfig.from_options(merged)
    samples = list(sample_inputs)
    if not samples:
        raise ValueError("calibrate: sample_inputs is empty")

    sites = _probe_sites(model, samples, config, max_rows)
    by_location: dict[str, list[_Site]] = {}
    for site in sites:
        by_location.setdefault(site.location, []).append(site)
    keys = _site_keys(by_location)
    calibration = {}
    for location, group in by_location.items():
        xs = [torch.cat(site.rows) for site in group]
        options_ = _predictor_options(group[0].weight, predictors, ranks)
        calibrate_site = _calibrate_logits if group[0].kind == "logits" else _calibrate_ffn
        entry = calibrate_site(group, xs, options_, recall_target, rows_per_call)
        rows = sum(x.shape[0] for x in xs)
        entry.update(recall_target=recall_target, recall=round(min(1.0, entry["recall"]), 6), rows=rows)
        calibration[keys[location]] = entry
        logger.info("calibrate %s: %s", keys[location], entry)
    hire = options.get("hire", {})
    hire = {"enabled": hire} if isinstance(hire, bool) else dict(hire)
    hire["calibration"] = {**hire.get("calibration", {}), **calibration}
    merged["hire"] = hire
    ApproxTopkConfig.from_options(merged)  # the result must be valid options
    return merged
