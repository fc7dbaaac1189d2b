"""Caveats: what a run means that its numbers alone do not show, read back from what it recorded."""

from __future__ import annotations

import pandas as pd

from sim.core.caveats import caveats, unmoved


def scores(run_id: str, scheme: str, losses: dict[str, list[float]]) -> pd.DataFrame:
    """Loss rows of one run: institution -> its loss in rounds 0, 1, ..."""
    return pd.DataFrame([{"run_id": run_id, "scheme": scheme, "institution": name, "round": r, "metric": "loss",
                          "value": v} for name, values in losses.items() for r, v in enumerate(values)])


def test_a_run_whose_models_never_moved_says_so_and_one_that_trained_does_not():
    # Prepare: a run that trained, and one in which every round scores exactly as the start
    trained = scores("a", "fedavg", {"x": [2.3, 1.1, 0.9], "y": [2.3, 1.4, 1.0], "global": [2.3, 1.2, 0.9]})
    still = scores("b", "dp_fedavg", {"x": [2.3, 2.3, 2.3], "y": [2.1, 2.1, 2.1], "global": [2.2, 2.2, 2.2]})
    # Execute
    one, both = unmoved(still), unmoved(pd.concat([trained, still]))
    # Assert: named for the run alone and counted among several; silent for a run that moved
    assert one.startswith("in the run no model ever moved: every round scores exactly as the starting model")
    assert both.startswith("in 1 of 2 runs (dp_fedavg) no model ever moved")
    assert unmoved(trained) is None and caveats([{}], None, trained) == []


def test_institutions_of_one_class_in_some_seeds_are_named_with_how_many():
    # Prepare: two seeds, two schemes each (the schemes of a seed share its data)
    rows = [{"institution": name, "seed": seed, "scheme": scheme, "classes": classes}
            for scheme in ("isolated", "fedavg")
            for seed, counts in ((0, {"a": 1, "b": 3}), (1, {"a": 4, "b": 1}))
            for name, classes in counts.items()]
    rows += [{"institution": "c", "seed": seed, "scheme": "fedavg", "classes": 1} for seed in (0, 1)]
    # Execute
    said = caveats([{}], pd.DataFrame(rows))
    # Assert: counted by seed, and an institution of one class in every seed named plainly
    assert said == ["a (in 1 of 2 seeds), b (in 1 of 2 seeds) and c hold a single class in their training data: "
                    "their accuracy there is over one class only, so training alone can score 100% by always "
                    "answering it"]
