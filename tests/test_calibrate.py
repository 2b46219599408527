"""calibrate(): measured recall per site, options the backend reads, and the round trip."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topk_compiler import ApproxTopkConfig, calibrate, explain
from topk_compiler.backend import run_passes

D, N, D_FF = 32, 3000, 256


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def structured(n, d, rank, noise, gen):
    spectrum = 1.0 / torch.arange(1, rank + 1).float() ** 0.5
    return (torch.randn(n, rank, generator=gen) * spectrum) @ torch.randn(rank, d, generator=gen) / d**0.5 + \
        noise * torch.randn(n, d, generator=gen) / d**0.5


class TinyLM(nn.Module):
    """Two ReLU FFN blocks in a loop (one source line, two sites) and a logits top-k."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.up = nn.ModuleList(nn.Linear(D, D_FF) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(D_FF, D) for _ in range(2))
        self.emb = nn.Parameter(structured(N, D, 8, 0.3, gen))
        with torch.no_grad():
            for up in self.up:
                up.weight.copy_(structured(D_FF, D, 6, 0.2, gen))
                up.bias.copy_(-1.3 * up.weight.norm(dim=1))

    def forward(self, x):
        for up, down in zip(self.up, self.down):
            x = x + down(F.relu(up(x)))
        return torch.topk(x @ self.emb.T, 10)


def recall(indices, exact):
    return sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(indices, exact)) / exact.numel()


def test_round_trip_meets_the_target_on_held_out_rows():
    model = TinyLM()
    gen = torch.Generator().manual_seed(1)
    calibration_set = [torch.randn(4, D, generator=gen) for _ in range(100)]
    options = calibrate(model, calibration_set, recall_target=0.9, hire={"rewrite": "always"})

    sites = options["hire"]["calibration"]
    assert len(sites) == 2  # the loop's two FFNs share one source line
    for key, entry in sites.items():
        assert key.startswith("test_calibrate.py:")
        assert entry["recall"] >= 0.9 and entry["recall_target"] == 0.9
    assert sum("threshold" in entry for entry in sites.values()) == 1  # the FFN entry
    assert sorted(entry["rows"] for entry in sites.values()) == [400, 800]  # 2 FFN sites share an entry
    ApproxTopkConfig.from_options(options)  # valid backend options

    seen = []

    def backend(gm, example_inputs):
        seen.append(run_passes(gm, example_inputs, ApproxTopkConfig.from_options(options)))
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    held_out = torch.randn(400, D, generator=gen)
    with torch.no_grad():
        _, indices = compiled(held_out)
        _, exact = model(held_out)
    assert all(d.rewritten and d.details["settings"] == "calibration" for d in seen[0])
    assert len(seen[0]) == 3
    assert recall(indices, exact) >= 0.85  # held-out rows, FFN errors included


def test_higher_target_needs_more_candidates():
    model = TinyLM()
    samples = [torch.randn(8, D) for _ in range(25)]
    low = calibrate(model, samples, recall_target=0.8, predictors=["lowrank"], ranks=[4])
    high = calibrate(model, samples, recall_target=0.99, predictors=["lowrank"], ranks=[4])
    for key in low["hire"]["calibration"]:
        lo, hi = low["hire"]["calibration"][key], high["hire"]["calibration"][key]
        assert lo["predictor"] == hi["predictor"] == "lowrank" and lo["rank"] == hi["rank"] == 4
        assert 0.8 <= lo["recall"] < 0.99 <= hi["recall"]
        assert hi["candidates"] > lo["candidates"]
        if "threshold" in lo:
            assert hi["threshold"] < lo["threshold"]


def test_ffn_threshold_meets_the_target_on_its_rows():
    """The FFN entry's threshold, applied with the real predictor to the calibration rows, recovers
    the target share of the activation mass, and the mean neuron count matches."""
    model = TinyLM()
    samples = [torch.randn(8, D) for _ in range(25)]
    options = calibrate(model, samples, recall_target=0.9, predictors=["int8"])
    (entry,) = [e for e in options["hire"]["calibration"].values() if "threshold" in e]
    from topk_compiler.lowering.hire_predictor import predictor_for

    rows = torch.cat(samples)
    for up, down in zip(model.up, model.down):
        pred = predictor_for(up.weight, "int8").scores(rows, up.bias)
        mass = torch.relu(F.linear(rows, up.weight, up.bias))
        total = mass.sum(1)  # a row with no active neuron is fully recovered by any choice
        recall = torch.where(total > 0, (mass * (pred > entry["threshold"])).sum(1) / total.clamp_min(1e-30), 1.0).mean()
        assert recall >= 0.9 - 1e-6
        assert (pred > entry["threshold"]).sum(1).float().mean() <= entry["candidates"]
        rows = rows + down(torch.relu(up(rows))).detach()  # the next block's input


def test_options_are_kept_and_sample_forms_accepted():
    model = TinyLM()
    options = calibrate(model, [torch.randn(2, D), (torch.randn(2, D),), {"x": torch.randn(2, D)}],
                        recall_target=0.9, predictors=("int8",), layout="shuffled",
                        hire={"ffn_activations": ["relu"]})
    assert options["layout"] == "shuffled" and options["recall_target"] == 0.9
    assert options["hire"]["ffn_activations"] == ["relu"]
    assert {e["predictor"] for e in options["hire"]["calibration"].values()} == {"int8"}
    with torch.no_grad():
        report = explain(model, torch.randn(1, D), **options)
    assert {d.details.get("settings") for d in report if d.pass_name.startswith("hire")} == {"calibration"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(recall_target=0.0), "recall_target"), (dict(predictors=["svd"]), "predictors"),
    (dict(ranks=[0]), "ranks"), (dict(max_rows=0), "max_rows"), (dict(rows_per_call=0), "rows_per_call"),
    (dict(bogus=1), "unknown option"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(TinyLM(), [torch.randn(1, D)], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        calibrate(TinyLM(), [])
    with pytest.raises(TypeError, match="sample"):
        calibrate(TinyLM(), [3])


class GeluFfn(nn.Module):
    """A GELU FFN where activation mass and output part ways: the first half of the neurons are
    strongly active in identical pairs whose W2 columns are opposite (their outputs cancel), the
    second half weakly negative with W2 columns along one direction (their outputs add up)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        half = D_FF // 2
        self.up, self.down = nn.Linear(D, D_FF), nn.Linear(D_FF, D)
        with torch.no_grad():
            pairs = structured(half // 2, D, 6, 0.2, gen) * 4
            self.up.weight.copy_(torch.cat([pairs.repeat_interleave(2, 0), 0.3 * torch.randn(half, D, generator=gen) / D**0.5]))
            self.up.bias.copy_(torch.cat([torch.full((half,), 2.0), torch.full((half,), -1.0)]))
            v = torch.randn(D, half // 2, generator=gen)
            u = torch.randn(D, 1, generator=gen)
            w2 = torch.cat([torch.stack([v, -v], 2).reshape(D, half), u + 0.1 * torch.randn(D, half, generator=gen)], 1)
            self.down.weight.copy_(w2 / D_FF**0.5)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def gelu_output_error(model, rows, pred, threshold):
    act = F.gelu(model.up(rows))
    full = act @ model.down.weight.T
    dropped = act.masked_fill(pred > threshold, 0.0) @ model.down.weight.T
    return (dropped.norm() / full.norm()).item()


def test_gelu_threshold_bounds_the_output_error():
    """Mass recall alone keeps too few neurons here (the dropped ones' outputs add up); the
    calibrated threshold keeps the relative output error within 1 - recall_target."""
    import importlib

    from topk_compiler.lowering.hire_predictor import predictor_for

    calibrate_module = importlib.import_module("topk_compiler.calibrate")  # the package exports the function

    model = GeluFfn()
    samples = [torch.randn(16, D, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    options = calibrate(model, samples, recall_target=0.9, predictors=["lowrank"], ranks=[2, 4],
                        hire={"ffn_activations": ["gelu"]})
    (entry,) = options["hire"]["calibration"].values()
    rows = torch.cat(samples)
    with torch.no_grad():
        pred = predictor_for(model.up.weight, "lowrank", entry["rank"]).scores(rows, model.up.bias)
        error = gelu_output_error(model, rows, pred, entry["threshold"])
        site = calibrate_module._Site("m.py:1", "ffn", model.up.weight, model.up.bias, activation="gelu",
                                      w2=model.down.weight)
        curve = calibrate_module._ffn_curve(site, rows, lambda xs: predictor_for(
            model.up.weight, "lowrank", entry["rank"]).scores(xs, model.up.bias).float())
        mass_only, _, _ = calibrate_module._shared_threshold([curve], 0.9)
        assert gelu_output_error(model, rows, pred, mass_only) > 0.1  # the case needs the bound
    assert entry["output_error"] <= 0.1 and error == pytest.approx(entry["output_error"], abs=1e-4)
    assert entry["threshold"] < mass_only
