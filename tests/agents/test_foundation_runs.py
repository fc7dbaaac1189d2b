"""The transformer path end to end on Ray: a tiny BERT with LoRA, only adapters and head crossing, same numbers anywhere."""

import numpy as np
import pandas as pd
import pytest

from sim.cli import compose
from sim.checks import load_spec
from sim.engine import run
from sim.core.models import build_model, get_state
from sim.core.types import state_nbytes

INSTITUTIONS = ["city_hospital", "rural_clinic", "particle_lab", "astro_institute", "central_bank", "credit_union"]
WORDS = {0: "patient fever dose clinic nurse scan", 1: "market loan rate bank credit price"}


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    """A small text table: every default institution writes 24 notes of two kinds, drawn from a seeded RNG."""
    rng = np.random.default_rng(0)
    rows = []
    for name in INSTITUTIONS:
        for k in range(24):
            label = int(rng.integers(2))
            words = rng.choice(WORDS[label].split(), size=5).tolist() + rng.choice(WORDS[1 - label].split(), 1).tolist()
            rows.append({"institution": name, "text": " ".join(rng.permutation(words)), "label": label})
    path = tmp_path_factory.mktemp("notes") / "notes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def cfg_of(small_cfg, notes, *extra):
    # Token ids cannot be shifted: the default scenario's feature skews go.
    flat = [f"scenario.institutions.{i}.feature_skew=0" for i in (1, 3, 5)]
    return compose("config", ["smoke=true", "data=text", f"data.path={notes}", "model=tiny_transformer", "rounds=2",
                              *flat, *extra])


def values(result):
    m = result.metrics.sort_values(["round", "institution", "metric"]).reset_index(drop=True)
    return m[["round", "institution", "metric", "value"]]


def test_tiny_transformer_runs_on_ray_and_only_adapters_and_head_cross(small_cfg, notes, ray_cluster):
    # Execute: FedAvg of a tiny BERT with LoRA on two pooled Ray hosts
    cfg = cfg_of(small_cfg, notes, "scheme=fedavg", "placement=pooled", "engine.pooled_hosts=2")
    result = run(cfg)
    # Assert: every institution's upload per round is exactly the bytes of the LoRA adapters and the head
    model = build_model(load_spec(cfg).model, (32,), 2, seed=0)
    trainable = get_state(model)
    assert all("lora_" in k or "classifier" in k for k in trainable)
    ledger = result.ledger[(result.ledger.institution != "global") & result.ledger.participated]
    assert len(ledger) == 2 * 6 and set(ledger.bytes_up) == {state_nbytes(trainable)}
    assert state_nbytes(trainable) < 0.05 * sum(p.numel() * 4 for p in model.parameters())
    acc = result.metrics[(result.metrics.metric == "accuracy") & (result.metrics.institution == "global")]
    assert acc.value.between(0, 1).all() and len(acc) == 3


def test_the_transformer_path_gives_identical_metrics_on_any_placement(small_cfg, notes, ray_cluster):
    # FedPer: shared adapters, personal heads swapped in and out of each host's one model; 3 hosts, 2 hosts, none.
    three = run(cfg_of(small_cfg, notes, "scheme=fedper", "placement=pooled", "engine.pooled_hosts=3"))
    two = run(cfg_of(small_cfg, notes, "scheme=fedper", "placement=pooled", "engine.pooled_hosts=2"))
    inprocess = run(cfg_of(small_cfg, notes, "scheme=fedper"), backend="inprocess")
    pd.testing.assert_frame_equal(values(three), values(two), check_exact=True)
    pd.testing.assert_frame_equal(values(three), values(inprocess), check_exact=True)
