"""Wrappers compose over every scheme: each scheme x wrapper pair (and a few triples) runs 2 rounds or is refused.

A refusal is the pre-run check's: one ConfigError, raised before any actor or data, naming the wrapper option and
the scheme. A pair that is accepted runs two rounds in this process, and its ledger shows the wrapper at work.
"""

from __future__ import annotations

import numpy as np
import pytest

from agents.schemes import SCHEMES
from agents.wrappers import GROUPS, wrap
from agents.wrappers.base import describe, layers
from sim.checks import load_spec
from sim.cli import compose, group_options
from sim.core import schema
from sim.core.types import ConfigError
from sim.engine import run

TINY = ["smoke=true", "rounds=2", "data.num_samples=400", "checkpoint_every=0", "results.select=last",
        "engine.eval_every=2"]
PUBLIC = ["data.public={source: heldout, rows: 60}"]  # unlabeled rows the distilling schemes distil on
SCENARIO = {"compute_share": ["+experiment=slow_hardware"],  # it needs slow institutions to plan for
            "feddf": PUBLIC, "fedmd": PUBLIC}
OPTIONS = [(g, o) for g in GROUPS for o in group_options(g) if o not in ("mean", "none")]
TRIPLES = [("fedprox", ("aggregator=krum", "compression=topk")), ("fedadam", ("privacy=client_dp", "secagg=masked")),
           ("ditto", ("aggregator=median", "compression=int8")), ("dp_fedavg", ("secagg=masked",)),
           ("fedavg", ("aggregator=median", "secagg=masked")), ("fedavg", ("compression=topk", "secagg=masked"))]


def overrides(scheme: str, *wrappers: str) -> list[str]:
    """A tiny run of ``scheme`` with ``wrappers`` (``group=option``)."""
    return [*TINY, *SCENARIO.get(scheme, []), f"scheme={scheme}", *wrappers]


def test_the_groups_are_the_schemas_and_each_has_a_none_option() -> None:
    assert GROUPS == schema.WRAPPERS
    assert [o for g in GROUPS for o in group_options(g) if o in ("mean", "none")] == ["mean", "none", "none", "none"]


def checked(scheme: str, *wrappers: str):
    """The validated spec, or the refusal (asserted to name both the scheme and a wrapper)."""
    try:
        return load_spec(compose("config", overrides(scheme, *wrappers)))
    except ConfigError as e:
        text = str(e)
        assert "\n" not in text and scheme in text, text
        assert any(w in text for w in wrappers), text
        assert e.key in (*GROUPS, "scheme"), text
        return e


@pytest.fixture(scope="module")
def matrix() -> dict[tuple[str, ...], object]:
    """Every scheme x wrapper option, and the triples: spec or refusal."""
    pairs = {(s, f"{g}={o}"): checked(s, f"{g}={o}") for s in sorted(SCHEMES) for g, o in OPTIONS}
    return pairs | {(s, *w): checked(s, *w) for s, w in TRIPLES}


def test_every_pair_is_accepted_or_refused_in_one_line_naming_both(matrix) -> None:
    # Assert: the expected shape of the matrix (what wraps what, docs/explanation/schemes-and-wrappers.md, "Wrappers")
    accepted = {k for k, v in matrix.items() if not isinstance(v, ConfigError)}
    assert ("fedprox", "aggregator=krum") in accepted and ("fedadam", "privacy=client_dp") in accepted
    assert ("scaffold", "compression=topk") in accepted and ("compute_share", "secagg=masked") in accepted
    for refused in [("isolated", "compression=topk"), ("pooled", "aggregator=median"), ("scaffold", "secagg=masked"),
                    ("qffl", "privacy=client_dp"), ("fedbuff", "aggregator=krum"), ("fedper", "secagg=masked"),
                    ("dp_fedavg", "privacy=client_dp"), ("fedavg", "aggregator=median", "secagg=masked"),
                    ("fedavg", "compression=topk", "secagg=masked")]:
        assert isinstance(matrix[refused], ConfigError), refused
    assert ("fedprox", "aggregator=krum", "compression=topk") in accepted
    assert ("dp_fedavg", "secagg=masked") in accepted


def wrapped_name(spec) -> str:
    """How the built scheme describes itself (scheme and its layers)."""
    from agents.wrappers import build

    return describe(build(spec.scheme, spec.wrappers))


def test_every_accepted_combination_runs_two_rounds(matrix) -> None:
    # Execute: each accepted combination, two rounds in this process
    for key, spec in matrix.items():
        if isinstance(spec, ConfigError):
            continue
        result = run(spec, backend="inprocess")
        ledger, metrics = result.ledger, result.metrics
        # Assert: both rounds ran and scored; what the wrapper does shows where it should
        assert sorted(ledger["round"].unique()) == [1, 2], key
        assert np.isfinite(metrics[metrics.metric == "accuracy"].value).all(), key
        if any(w.startswith("privacy=") for w in key[1:]) or key[0] == "dp_fedavg":
            assert ledger["epsilon"].max() > 0, key
        assert all(w.split("=")[1] in wrapped_name(spec) for w in key[1:]), (key, wrapped_name(spec))


def test_a_preset_keeps_its_layer_in_the_fixed_order() -> None:
    # dp_fedavg is FedAvg under client-level DP: secure aggregation goes inside its privacy layer, never outside
    spec = load_spec(compose("config", overrides("dp_fedavg", "secagg=masked")))
    from agents.wrappers import build

    built = build(spec.scheme, spec.wrappers)
    assert [w.group for w in layers(built)] == ["privacy", "secagg"]
    with pytest.raises(ConfigError, match="privacy=client_dp cannot wrap scheme dp_fedavg: it already brings"):
        wrap(built, {"privacy": {"_target_": "agents.wrappers.privacy.ClientDP", "noise_multiplier": 1.0}})


def test_a_config_saved_before_the_layers_and_wrappers_loads_as_what_it_meant() -> None:
    # Prepare: a fedprox config as runs wrote it before (wrapper keys in the scheme, no wrapper groups, the old model path)
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose("config", ["smoke=true", "scheme=fedprox"]), resolve=True)
    for group in GROUPS:
        del cfg[group]
    cfg["scheme"] |= {"merge": "median", "trim": 0.2, "byzantine": 1, "krum_m": 1, "clip_norm": 0.1,
                      "secure_aggregation": False, "compression": "topk", "compression_ratio": 0.2, "error_feedback": True}
    cfg["model"]["_target_"] = "sim" + ".models.mlp"  # spelt apart: the path as old configs hold it
    # Execute
    spec = load_spec(cfg)
    # Assert: the groups its keys meant, the scheme without them, the factory at its new home
    assert spec.wrappers == {"aggregator": {"_target_": "agents.wrappers.robust.Median"},
                             "compression": {"_target_": "agents.wrappers.compression.Compression", "method": "topk",
                                             "ratio": 0.2, "error_feedback": True}}
    assert not {"merge", "clip_norm", "compression"} & set(spec.scheme) and spec.scheme["mu"] == 0.01
    assert spec.model["_target_"] == "sim.core.models.mlp"
    assert wrapped_name(spec) == "scheme fedprox with aggregator=median with compression=topk"
