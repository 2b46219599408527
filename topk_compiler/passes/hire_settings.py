"""How a HiRE site gets its recall target, predictor, rank, k' (logits) or threshold (FFN).

In order: the site's recall target from ``site_overrides`` (else the global one); then its entry
in ``hire.calibration`` when that entry was measured for at least this recall target; then
``hire.predictor`` / ``hire.rank`` / ``hire.candidates``; then the defaults below, with a warning
in the report, since nothing then says which recall the site reaches.

Defaults (uncalibrated; their recall depends entirely on the weight's spectrum):
* rank: an eighth of min(n, d), within [16, 256]: at d = 4096, V = 128256 a rank-256 predictor
  reads 1/16 of the weight.
* logits k': max(8 k, k + 64).
* FFN: the neurons whose predicted pre-activation exceeds ``hire.ffn_threshold`` (0: predicted
  active); the cost model then assumes a quarter of the neurons per row, well above the 5-15% that
  ReLU LLM FFNs activate per token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from topk_compiler.config import ApproxTopkConfig, site_matches

logger = logging.getLogger("topk_compiler")

DEFAULT_RANK_FRACTION = 8
DEFAULT_RANK_RANGE = (16, 256)
DEFAULT_LOGITS_FACTOR = 8
DEFAULT_LOGITS_MARGIN = 64
DEFAULT_FFN_FRACTION = 4


@dataclass(frozen=True)
class SiteSettings:
    """The settings one HiRE site runs with, and where they came from.

    args:
        recall_target: the site's recall target (1.0: exact, not rewritten).
        override: the ``site_overrides`` key that named the site, if any.
        predictor, rank: the predictor the op runs with (rank 0 for quantized predictors).
        candidates: logits: k'; FFN: the expected number of neurons per row (cost model only).
        threshold: FFN: a row computes the neurons predicted above it (None at logits sites).
        source: "calibration", "options" or "default".
        calibrated_recall: recall measured by calibration (None when not calibrated).
        warning: why the settings are not backed by a measurement, if they are not.
    """

    recall_target: float
    override: str | None
    predictor: str
    rank: int
    candidates: int
    source: str
    threshold: float | None = None
    calibrated_recall: float | None = None
    warning: str | None = None


def default_rank(n: int, d: int) -> int:
    low, high = DEFAULT_RANK_RANGE
    return max(1, min(min(n, d), max(low, min(high, min(n, d) // DEFAULT_RANK_FRACTION))))


def default_candidates(kind: str, n: int, k: int | None) -> int:
    if kind == "logits":
        return max(DEFAULT_LOGITS_FACTOR * k, k + DEFAULT_LOGITS_MARGIN)
    return max(1, n // DEFAULT_FFN_FRACTION)


def site_settings(config: ApproxTopkConfig, location: str | None, kind: str, n: int, d: int,
                  k: int | None = None) -> SiteSettings:
    """Settings of a ``kind`` ("logits" or "ffn") site over an [n, d] weight (k: the top-k's k)."""
    override_key, override = config.override_for(location)
    recall_target = override.recall_target if override.recall_target is not None else config.recall_target
    hire = config.hire
    skipped = None
    for site, entry in hire.calibration.items():
        if not site_matches(site, location):
            continue
        if entry["recall_target"] + 1e-12 < recall_target:
            skipped = (f"calibration of {site!r} is for recall {entry['recall_target']:g} < target "
                       f"{recall_target:g}: not used")
            continue
        threshold = float(entry.get("threshold", hire.ffn_threshold)) if kind == "ffn" else None
        return SiteSettings(recall_target, override_key, entry["predictor"], int(entry["rank"]),
                            int(entry["candidates"]), "calibration", threshold, entry.get("recall"))
    predictor = hire.predictor
    rank = (hire.rank or default_rank(n, d)) if predictor == "lowrank" else 0
    if kind == "ffn":
        candidates, threshold = default_candidates(kind, n, k), hire.ffn_threshold
        given = False
        what = f"threshold={threshold:g}, {candidates} neurons per row assumed by the cost model"
    else:
        candidates, threshold = hire.candidates or default_candidates(kind, n, k), None
        given = hire.candidates is not None and (hire.rank is not None or predictor != "lowrank")
        what = f"{'default' if hire.candidates is None else 'given'} k'={candidates}"
    warning = None
    if not given:
        warning = (f"uncalibrated: {'default' if hire.rank is None else 'given'} rank={rank}, {what} "
                   "(recall not measured; run topk_compiler.calibrate)")
    if skipped:
        warning = skipped + ("; " + warning if warning else "")
    if warning:
        logger.warning("approx_topk HiRE site %s: %s", location, warning)
    return SiteSettings(recall_target, override_key, predictor, rank, candidates,
                        "options" if given else "default", threshold, None, warning)
