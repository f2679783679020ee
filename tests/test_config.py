import dataclasses
import json

import pytest

from vlcache import CompressionConfig
from vlcache.config import settings_read_by
from vlcache.methods import available, method_class


def test_defaults_are_vlcache_at_ten_percent():
    c = CompressionConfig()
    assert (c.method, c.budget, c.settings.threshold) == ("vlcache", 0.1, 0.01)


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
    method = {"window": "snapkv", "pool_kernel": "snapkv", "sinks": "streaming", "pyramid_beta": "pyramidkv"}
    with pytest.raises(ValueError, match=match):
        CompressionConfig.create(**{"method": method.get(next(iter(kwargs)), "vlcache"), **kwargs})


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
    c = CompressionConfig.create("tgvkv", budget=0.05, per_head=False, sinks=2)
    assert CompressionConfig.from_dict(c.to_dict()) == c
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()
    with pytest.raises(ValueError, match="unknown CompressionConfig fields: bogus"):
        CompressionConfig.from_dict({"bogus": 1})


def test_min_keep_tokens():
    c = CompressionConfig(min_layer_budget=0.01)
    assert c.min_keep(50) == 1 and c.min_keep(100) == 1 and c.min_keep(101) == 2 and c.min_keep(1000) == 10


# --- per-method settings ----------------------------------------------------------------------
def test_each_config_holds_only_its_methods_settings():
    for name in available():
        c = CompressionConfig(method=name)
        assert type(c.settings) is method_class(name).settings_type
        assert set(c.to_dict()["settings"]) == set(method_class(name).settings_type.names())
    assert set(CompressionConfig(method="snapkv").settings_dict()) == {"window", "pool_kernel"}
    assert set(CompressionConfig(method="vlcache-nowindow").settings_dict()) == {"threshold", "query_window"}


def test_hash_reads_only_what_the_method_reads():
    # a setting of another method cannot be given, so it cannot move the hash ...
    with pytest.raises(ValueError, match=r"method 'vlcache' has no setting pool_kernel \(its settings: threshold"):
        CompressionConfig.create("vlcache", pool_kernel=3)
    # ... while the method's own settings do
    base = CompressionConfig.create("snapkv", 0.2)
    assert base.compute_hash() != CompressionConfig.create("snapkv", 0.2, pool_kernel=3).compute_hash()
    assert base.compute_hash() == CompressionConfig.create("snapkv", 0.2, pool_kernel=5).compute_hash()
    assert CompressionConfig().compute_hash() != CompressionConfig.create(threshold=0.02).compute_hash()


def test_settings_of_another_method_are_refused():
    with pytest.raises(ValueError, match="takes VLCacheSettings, not SnapKVSettings"):
        CompressionConfig(method="vlcache", settings=CompressionConfig(method="snapkv").settings)


def test_changing_method_keeps_the_shared_settings_only():
    c = CompressionConfig.create("vlcache", 0.3, threshold=0.05, recent_fraction=0.2, per_head=False)
    u = c.with_changes(method="vlcache-nowindow")
    assert (u.budget, u.per_head, u.settings_dict()) == (0.3, False, {"threshold": 0.05, "query_window": None})
    s = c.with_changes(method="snapkv", budget=0.5, window=4)
    assert (s.budget, s.settings_dict()) == (0.5, {"window": 4, "pool_kernel": 5})
    with pytest.raises(ValueError, match="no setting window"):
        c.with_changes(window=4)


def test_settings_read_by_filters_a_sweeps_shared_knobs():
    assert settings_read_by("random", {"seed": 3, "window": 2}) == {"seed": 3}
    assert settings_read_by("vlcache", {"seed": 3}) == {}


def test_a_setting_name_means_one_thing_across_methods():
    # one CLI flag per setting name: its type and default must not depend on the method
    seen: dict[str, tuple[object, object]] = {}
    for name in available():
        cls = method_class(name).settings_type
        for f in dataclasses.fields(cls):
            assert seen.setdefault(f.name, (f.type, f.default)) == (f.type, f.default), (name, f.name)
    assert {"threshold", "window", "sinks", "seed"} <= set(seen)
