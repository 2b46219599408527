"""The rounds simulation behind BRACKET_VALUE_ROUNDS: the claim its numbers make, on one call."""

from benchmarks.simulate_threshold_rounds import simulate


def test_value_rounds_shorten_the_search_on_random_normal_buckets():
    rows = simulate(calls=1)
    for buckets in (8, 16):
        rounds = {r["search"]: r["mean_rounds"] for r in rows if r["buckets"] == buckets}
        assert set(rounds) == {"digits", "bracket, key order", "bracket, 4 value rounds"}
        assert rounds["bracket, 4 value rounds"] < rounds["digits"] - 1.5
