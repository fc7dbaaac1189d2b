"""Scenarios: explicit lists and generated populations become validated, frozen specs."""

import pytest

from sim.core.scenario import build_scenario
from sim.core.types import ConfigError

TWO = [
    {"name": "a", "discipline": "medicine", "share": 0.7, "cpus": 0.5},
    {"name": "b", "discipline": "physics", "share": 0.3, "gpus": 0.5, "label_skew": 0.3},
]


def test_explicit_list_keeps_order_and_fields():
    # Execute
    s = build_scenario({"name": "two", "institutions": TWO}, seed=0)
    # Assert
    assert s.names == ("a", "b")
    assert [i.index for i in s.institutions] == [0, 1]
    assert s.institutions[1].gpus == 0.5 and s.institutions[1].label_skew == 0.3
    assert s.disciplines == ("medicine", "physics")


def test_generated_population_has_power_law_shares_and_round_robin_disciplines():
    cfg = {"name": "pop", "num_institutions": 30, "disciplines": ["x", "y", "z"], "quantity_skew": 1.5,
           "label_skew": 0.5, "cpus": 0.1}
    s = build_scenario(cfg, seed=3)
    shares = sorted(i.share for i in s.institutions)
    assert len(s.institutions) == 30 and s.name == "pop-n30"
    assert sum(shares) == pytest.approx(1.0)
    assert shares[-1] > 10 * shares[0]  # half spread evenly: (1/60 + 0.5/2.3) vs 1/60 + tiny ~ 14x
    assert [i.discipline for i in s.institutions[:4]] == ["x", "y", "z", "x"]
    assert build_scenario(cfg, seed=3) == s  # deterministic from the seed


@pytest.mark.parametrize(
    "change, key",
    [
        ({"share": -0.1}, "scenario.institutions[0].share"),
        ({"share": 0.5}, "scenario.institutions"),  # 0.5 + 0.3 != 1
        ({"cpus": -1}, "scenario.institutions[0].cpus"),
        ({"sahre": 0.7}, "scenario.institutions[0].sahre"),
        ({"behaviour": "sneaky"}, "scenario.institutions[0].behaviour"),
        ({"name": "b"}, "scenario.institutions[1].name"),
        ({"gpus": "one"}, "scenario.institutions[0].gpus"),
    ],
)
def test_bad_institution_is_refused_naming_the_key(change, key):
    rows = [dict(TWO[0], **change), TWO[1]]
    with pytest.raises(ConfigError) as err:
        build_scenario({"institutions": rows}, seed=0)
    assert err.value.key == key


def test_bad_population_size_is_refused():
    with pytest.raises(ConfigError) as err:
        build_scenario({"num_institutions": 0}, seed=0)
    assert err.value.key == "scenario.num_institutions"


def test_speed_scales_simulated_compute_and_is_checked():
    from sim.core import clock

    cfg = {"name": "s", "speed": 0.5, "institutions": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "speed": 2}]}
    a, b = build_scenario(cfg, seed=0).institutions
    assert (a.speed, b.speed) == (0.5, 2.0)
    assert clock.compute_seconds(a, 100, 1000) == pytest.approx(4 * clock.compute_seconds(b, 100, 1000))
    with pytest.raises(ConfigError, match=r"scenario.institutions\[0\].speed"):
        build_scenario({"name": "s", "institutions": [{"name": "a", "share": 1.0, "speed": 0}]}, seed=0)
