"""Configuration of the approx_topk backend.

Everything a user can set lives here, validated once. ``torch.compile(..., options=...)`` hands
us a flat dict; :meth:`ApproxTopkConfig.from_options` turns it into frozen dataclasses and
rejects unknown names, listing the valid ones. Each pass receives only its own slice.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from topk_compiler.lowering.layouts import MAX_SEED

LAYOUTS = ("interleaved", "contiguous", "shuffled")
REWRITE_POLICIES = ("auto", "always")
PREDICTORS = ("lowrank", "int8", "int4")
FFN_ACTIVATIONS = ("relu", "relu_squared", "gelu")
# Fields of one hire.calibration entry (what topk_compiler.calibrate writes).
CALIBRATION_FIELDS = ("predictor", "rank", "candidates", "threshold", "recall_target", "recall", "output_error",
                      "rows")

# "path/to/model.py:42" (a path suffix and a line number).
_SITE_KEY = re.compile(r"^(?P<path>.+):(?P<line>\d+)$")


def check_recall_target(value: Any, name: str = "recall_target") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (1.0 means exact), got {value!r}")
    return value


def check_layout(value: Any, name: str = "layout") -> str:
    if value not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {value!r}")
    return value


def _check_optional_positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _check_finite_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_nonnegative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True)
class SiteOverride:
    """Settings for one top-k call site, replacing the global ones where given.

    args:
        recall_target: recall target at this site (1.0 keeps it exact).
        layout: bucket layout at this site.
        num_buckets, per_bucket_k: fixed bucketing parameters at this site (both or neither).
        min_elements: reduced-axis length below which this site stays exact.
    """

    recall_target: float | None = None
    layout: str | None = None
    num_buckets: int | None = None
    per_bucket_k: int | None = None
    min_elements: int | None = None

    def __post_init__(self):
        if self.recall_target is not None:
            object.__setattr__(self, "recall_target", check_recall_target(self.recall_target, "site_overrides[...].recall_target"))
        if self.layout is not None:
            check_layout(self.layout, "site_overrides[...].layout")
        _check_optional_positive_int(self.num_buckets, "site_overrides[...].num_buckets")
        _check_optional_positive_int(self.per_bucket_k, "site_overrides[...].per_bucket_k")
        if (self.num_buckets is None) != (self.per_bucket_k is None):
            raise ValueError("site_overrides[...]: give num_buckets and per_bucket_k together, or neither")
        if self.min_elements is not None:
            _check_nonnegative_int(self.min_elements, "site_overrides[...].min_elements")

    @classmethod
    def from_value(cls, site: str, value: Any) -> SiteOverride:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(recall_target=value)
        if isinstance(value, Mapping):
            valid = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - valid)
            if unknown:
                raise ValueError(
                    f"site_overrides[{site!r}]: unknown option(s) {unknown}; valid: {sorted(valid)}"
                )
            return cls(**value)
        raise ValueError(
            f"site_overrides[{site!r}] must be a recall target (float) or a dict of options, got {value!r}"
        )


def site_matches(key: str, location: str | None) -> bool:
    """Does the override key ``"dir/model.py:42"`` name the source location ``"/abs/dir/model.py:42"``?

    The key's path must be a suffix of the location's path on a path-component boundary, and
    the line numbers must be equal.
    """
    if location is None:
        return False
    k, loc = _SITE_KEY.match(key), _SITE_KEY.match(location)
    if k is None or loc is None or k["line"] != loc["line"]:
        return False
    path, suffix = loc["path"].replace("\\", "/"), k["path"].replace("\\", "/")
    return path == suffix or path.endswith("/" + suffix.lstrip("/"))


@dataclass(frozen=True)
class TopkPassConfig:
    """Settings of the top-k rewrite pass (:mod:`topk_compiler.passes.topk_rewrite`).

    args:
        enabled: rewrite top-k call sites at all.
        layout: how the reduced axis is split into buckets. "interleaved" (element j goes to
            bucket j mod b) and "contiguous" (equal consecutive runs) meet the recall model for
            inputs in random order; "shuffled" rotates every run of b consecutive elements by a
            seeded pseudo-random offset first, which keeps the expected-recall guarantee for any
            input order (sorted, periodic, ...), at the same cost.
        min_elements: reduced-axis length below which a site stays exact.
        num_buckets, per_bucket_k: fixed bucketing parameters for every site (both or neither);
            by default the solver picks them from the recall target and the cost model.
        seed: seed of the "shuffled" layout.
        rewrite: "auto" rewrites a site only where the cost model predicts a speed-up on the
            input's device; "always" rewrites every eligible site (useful to measure the effect of
            the approximation on model quality, e.g. on a CPU machine).
        skip_unobserved_sort: run a site unsorted where it asks for sorted output but nothing
            downstream can observe the order (a scatter into zeros, a weighted sum of gathered
            rows; ``passes/output_order.py``). At recall target 1 only where the result is then
            bit for bit the same (a scatter, not a sum), up to which of values tied at the k-th
            is selected.
    """

    enabled: bool = True
    layout: str = "interleaved"
    min_elements: int = 1024
    num_buckets: int | None = None
    per_bucket_k: int | None = None
    seed: int = 0
    rewrite: str = "auto"
    skip_unobserved_sort: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"rewrite_topk must be a bool, got {self.enabled!r}")
        if not isinstance(self.skip_unobserved_sort, bool):
            raise ValueError(f"skip_unobserved_sort must be a bool, got {self.skip_unobserved_sort!r}")
        check_layout(self.layout)
        _check_nonnegative_int(self.min_elements, "min_elements")
        _check_optional_positive_int(self.num_buckets, "num_buckets")
        _check_optional_positive_int(self.per_bucket_k, "per_bucket_k")
        if (self.num_buckets is None) != (self.per_bucket_k is None):
            raise ValueError("give num_buckets and per_bucket_k together, or neither")
        _check_nonnegative_int(self.seed, "seed")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED}, got {self.seed!r}")
        if self.rewrite not in REWRITE_POLICIES:
            raise ValueError(f"rewrite must be one of {REWRITE_POLICIES}, got {self.rewrite!r}")


@dataclass(frozen=True)
class HireConfig:
    """Settings of the HiRE predict-then-compute rewrites (logits top-k and ReLU FFNs).

    A site's settings come from, in order: its entry in ``calibration`` (when that entry was
    measured for a recall target at least the site's), then ``rank`` / ``candidates`` given here,
    then the documented defaults of ``passes/hire_settings.py`` (and a warning in the report).

    args:
        enabled: rewrite matmul->topk and FFN patterns at all.
        predictor: "lowrank" (truncated SVD of the weight) or "int8" / "int4" (per-row scaled
            quantized copy of the weight).
        rank: rank of the low-rank predictor; None means calibrated, else a default from the shape.
        candidates: k' (the number of candidates scored exactly) for logits sites, or the number
            of neurons computed per row for FFN sites; None means calibrated, else a default.
        calibration: per-site settings measured by :func:`topk_compiler.calibrate`, keyed by site
            location ``"file.py:LINE"``; each entry holds ``predictor``, ``rank``, ``candidates``
            and the ``recall_target`` it was measured for (``recall`` and ``rows``, the measured
            recall and the rows it was measured on, and for GELU FFN sites ``output_error``, the
            FFN's relative output error there, are kept for the report).
        rewrite: "auto" rewrites a site only where the HiRE cost model predicts it cheaper than
            the dense form on the input's device (the op re-checks for every batch size it sees,
            running the dense form where that is cheaper); "always" rewrites every eligible site
            and always runs the predictor (to measure the approximation's effect, e.g. on a CPU).
        ffn_activations: activations whose FFNs are rewritten: "relu" and "relu_squared" (exact
            on the neurons a row keeps; a dropped inactive neuron contributes exactly 0), and
            "gelu" (opt-in: a dropped neuron's small negative GELU output is lost as well).
    """

    enabled: bool = True
    predictor: str = "lowrank"
    rank: int | None = None
    candidates: int | None = None
    ffn_threshold: float = 0.0
    calibration: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rewrite: str = "auto"
    ffn_activations: tuple[str, ...] = ("relu", "relu_squared")

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"hire.enabled must be a bool, got {self.enabled!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"hire.predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        _check_optional_positive_int(self.rank, "hire.rank")
        _check_optional_positive_int(self.candidates, "hire.candidates")
        object.__setattr__(self, "ffn_threshold", _check_finite_float(self.ffn_threshold, "hire.ffn_threshold"))
        if not isinstance(self.calibration, Mapping):
            raise ValueError(f"hire.calibration must be a dict, got {self.calibration!r}")
        for site, entry in self.calibration.items():
            check_calibration_entry(site, entry)
        if self.rewrite not in REWRITE_POLICIES:
            raise ValueError(f"hire.rewrite must be one of {REWRITE_POLICIES}, got {self.rewrite!r}")
        if isinstance(self.ffn_activations, str) or not isinstance(self.ffn_activations, (tuple, list)):
            raise ValueError(f"hire.ffn_activations must be a list of {FFN_ACTIVATIONS}, got {self.ffn_activations!r}")
        bad = [a for a in self.ffn_activations if a not in FFN_ACTIVATIONS]
        if bad:
            raise ValueError(f"hire.ffn_activations: unknown activation(s) {bad}; valid: {FFN_ACTIVATIONS}")
        object.__setattr__(self, "ffn_activations", tuple(self.ffn_activations))


def check_calibration_entry(site: Any, entry: Any) -> None:
    """Raises ValueError naming the site and field for a malformed ``hire.calibration`` entry."""
    if not isinstance(site, str) or _SITE_KEY.match(site) is None:
        raise ValueError(f"hire.calibration keys must look like 'model.py:42', got {site!r}")
    if not isinstance(entry, Mapping):
        raise ValueError(f"hire.calibration[{site!r}] must be a dict, got {entry!r}")
    unknown = sorted(set(entry) - set(CALIBRATION_FIELDS))
    if unknown:
        raise ValueError(f"hire.calibration[{site!r}]: unknown field(s) {unknown}; valid: {list(CALIBRATION_FIELDS)}")
    missing = [f for f in ("predictor", "rank", "candidates", "recall_target") if f not in entry]
    if missing:
        raise ValueError(f"hire.calibration[{site!r}]: missing field(s) {missing}")
    if entry["predictor"] not in PREDICTORS:
        raise ValueError(f"hire.calibration[{site!r}].predictor must be one of {PREDICTORS}, got {entry['predictor']!r}")
    _check_nonnegative_int(entry["rank"], f"hire.calibration[{site!r}].rank")
    if entry["predictor"] == "lowrank" and entry["rank"] < 1:
        raise ValueError(f"hire.calibration[{site!r}].rank must be >= 1 for a lowrank predictor, got {entry['rank']!r}")
    _check_optional_positive_int(entry["candidates"], f"hire.calibration[{site!r}].candidates")
    if entry["candidates"] is None:
        raise ValueError(f"hire.calibration[{site!r}].candidates must be a positive int, got None")
    check_recall_target(entry["recall_target"], f"hire.calibration[{site!r}].recall_target")
    if "threshold" in entry:
        _check_finite_float(entry["threshold"], f"hire.calibration[{site!r}].threshold")
    if "recall" in entry:
        check_recall_target(entry["recall"], f"hire.calibration[{site!r}].recall")
    if "output_error" in entry:
        _check_finite_float(entry["output_error"], f"hire.calibration[{site!r}].output_error")
    if "rows" in entry:
        _check_nonnegative_int(entry["rows"], f"hire.calibration[{site!r}].rows")


# Flat option names accepted by torch.compile(options=...), and where each one goes.
_TOPK_OPTIONS = {
    "rewrite_topk": "enabled",
    "layout": "layout",
    "min_elements": "min_elements",
    "num_buckets": "num_buckets",
    "per_bucket_k": "per_bucket_k",
    "seed": "seed",
    "rewrite": "rewrite",
    "skip_unobserved_sort": "skip_unobserved_sort",
}
_TOP_LEVEL_OPTIONS = ("recall_target", "site_overrides", "hire", "inductor", "mode")
# Inductor's compile modes. torch.compile refuses mode= beside options=, so ours carries it.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ApproxTopkConfig:
    """Everything the approx_topk backend reads.

    args:
        recall_target: default recall target of every site, in (0, 1]; 1.0 means exact.
        site_overrides: per-call-site settings keyed by source location ``"file.py:LINE"`` (any
            path suffix of the file that called topk, then its line), e.g.
            ``{"model.py:42": 0.99, "attn.py:10": {"recall_target": 1.0}}``.
        topk: settings of the top-k rewrite pass.
        hire: settings of the HiRE rewrites.
        inductor: Inductor config patches applied when compiling the rest of the graph.
        mode: Inductor's compile mode (one of ``MODES``), as torch.compile's ``mode=`` would set
            it: torch.compile takes either ``mode=`` or ``options=``, so with options it goes here
            (``"reduce-overhead"`` captures CUDA graphs). Patches in ``inductor`` win over it.
    """

    recall_target: float = 0.95
    site_overrides: tuple[tuple[str, SiteOverride], ...] = ()
    topk: TopkPassConfig = field(default_factory=TopkPassConfig)
    hire: HireConfig = field(default_factory=HireConfig)
    inductor: Mapping[str, Any] = field(default_factory=dict)
    mode: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "recall_target", check_recall_target(self.recall_target))
        for site, override in self.site_overrides:
            if not isinstance(site, str) or _SITE_KEY.match(site) is None:
                raise ValueError(f"site_overrides keys must look like 'model.py:42', got {site!r}")
            if not isinstance(override, SiteOverride):
                raise ValueError(f"site_overrides[{site!r}] must be a SiteOverride, got {override!r}")
        if not isinstance(self.inductor, Mapping):
            raise ValueError(f"inductor must be a dict of Inductor config patches, got {self.inductor!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {self.mode!r}")

    @classmethod
    def valid_options(cls) -> list[str]:
        return sorted((*_TOP_LEVEL_OPTIONS, *_TOPK_OPTIONS))

    def inductor_patches(self) -> dict[str, Any]:
        """The Inductor config patches the rest of the graph is compiled with: ``mode``'s, then
        ``inductor``'s over them."""
        from torch._inductor import list_mode_options

        return {**(list_mode_options(self.mode) if self.mode else {}), **self.inductor}

    def replays_cuda_graphs(self) -> bool:
        """Whether Inductor runs the compiled graph as CUDA graph replays (``mode`` or the
        ``triton.cudagraphs`` patch, else Inductor's own setting), so that no call pays the host's
        dispatch: the passes then price the device's work alone."""
        from torch._inductor import config as inductor_config

        return bool(self.inductor_patches().get("triton.cudagraphs", inductor_config.triton.cudagraphs))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ApproxTopkConfig:
        """Builds the config from ``torch.compile(..., options=...)``; unknown names raise."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.valid_options()))
        if unknown:
            raise ValueError(
                f"approx_topk: unknown option(s) {unknown}; valid options: {cls.valid_options()}"
            )
        topk = TopkPassConfig(**{_TOPK_OPTIONS[k]: v for k, v in options.items() if k in _TOPK_OPTIONS})
        hire = options.get("hire", {})
        if isinstance(hire, bool):
            hire = {"enabled": hire}
        if not isinstance(hire, Mapping):
            raise ValueError(f"hire must be a bool or a dict of HiRE options, got {hire!r}")
        hire_fields = {f.name for f in dataclasses.fields(HireConfig)}
        if set(hire) - hire_fields:
            raise ValueError(
                f"hire: unknown option(s) {sorted(set(hire) - hire_fields)}; valid: {sorted(hire_fields)}"
            )
        overrides = options.get("site_overrides", {})
        if not isinstance(overrides, Mapping):
            raise ValueError(f"site_overrides must be a dict keyed by 'file.py:LINE', got {overrides!r}")
        return cls(
            recall_target=options.get("recall_target", cls.recall_target),
            site_overrides=tuple(
                (site, SiteOverride.from_value(site, value)) for site, value in overrides.items()
            ),
            topk=topk,
            hire=HireConfig(**hire),
            inductor=dict(options.get("inductor", {})),
            mode=options.get("mode"),
        )

    def override_for(self, location: str | None) -> tuple[str | None, SiteOverride]:
        """The override whose key names ``location`` (and that key), or an empty one."""
        for site, override in self.site_overrides:
            if site_matches(site, location):
                return site, override
        return None, SiteOverride()
