import pytest

from vlcache import CompressionConfig
from vlcache.methods import available


def test_defaults_are_vlcache_at_ten_percent():
    c = CompressionConfig()
    assert (c.method, c.budget, c.threshold) == ("vlcache", 0.1, 0.01)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"method": "nope"}, "known methods: .*vlcache"),
        ({"threshold": 1.0}, "threshold"),
        ({"min_layer_budget": -0.1}, "min_layer_budget"),
        ({"window": 0}, "window"),
        ({"pool_kernel": 4}, "odd"),
        ({"sinks": -1}, "sinks"),
        ({"query_window": 0}, "query_window"),
        ({"pyramid_beta": 0.5}, "pyramid_beta"),
    ],
)
def test_invalid_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**kwargs)


def test_every_method_builds():
    for name in available():
        assert CompressionConfig(method=name).method == name


def test_hash_is_stable_and_tracks_what_changes_results():
    a = CompressionConfig()
    assert a.compute_hash() == CompressionConfig().compute_hash()
    assert len(a.compute_hash()) == 16
    assert a.compute_hash() != CompressionConfig(budget=0.2).compute_hash()
    assert a.compute_hash() != CompressionConfig(method="snapkv").compute_hash()
    assert a.compute_hash() != CompressionConfig(per_head=False).compute_hash()
    # chunk_size changes memory, not results
    assert a.compute_hash() == CompressionConfig(chunk_size=7).compute_hash()


def test_round_trip_and_unknown_fields():
    c = CompressionConfig(method="tgvkv", budget=0.05, per_head=False)
    assert CompressionConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown CompressionConfig fields: bogus"):
        CompressionConfig.from_dict({"bogus": 1})


def test_min_keep_tokens():
    c = CompressionConfig(min_layer_budget=0.01)
    assert c.min_keep(50) == 1 and c.min_keep(100) == 1 and c.min_keep(101) == 2 and c.min_keep(1000) == 10
