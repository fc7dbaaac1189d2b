"""What a run means that its numbers alone do not show: the caveats a reader must see next to them.

A warning at the start of a run scrolls away under hundreds of progress lines. The few that
change what the numbers mean are read back here from what the run itself recorded (its
config and its tables), so the run's final summary, a compare's table and the report repeat
them word for word, and a run read back years later still says them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import pandas as pd

from sim.core.types import spoken

__all__ = ["caveats", "invented_institutions", "single_class", "unmoved", "without_labels"]


def invented_institutions(config: Mapping[str, Any]) -> str | None:
    """The sentence for a file's rows spread over a built-in scenario's fictional institutions, else None.

    A table (or text corpus) whose sites were never named (``data.institution_column`` unset, or
    a partition other than natural) is dealt out to the scenario's own list of institutions: the
    gains are then those of invented partners, not of the sites in the file."""
    data, scenario = config.get("data") or {}, config.get("scenario") or {}
    if not isinstance(data, Mapping) or data.get("name") not in ("table", "text") or data.get("partition") == "natural" \
            or data.get("views"):  # views: every institution holds columns of the same rows, none is dealt rows
        return None
    if not isinstance(scenario, Mapping) or scenario.get("from_data") != "auto":
        return None  # a scenario the user chose (its own file, or from_data=false): the spread is what was asked for
    file = str(data.get("path") or "").rsplit("/", 1)[-1] or "the data file"
    return (f"the rows of {file} are spread over the fictional institutions of scenario={scenario.get('name')}, not "
            "over the file's own sites: set data.institution_column=COLUMN to make each site an institution")


def single_class(institutions: pd.DataFrame) -> str | None:
    """The sentence for institutions whose training data hold one class only (in every run, or in some), else None.

    Such an institution is legitimate (a specialised clinic; LEAF-style populations) but its
    accuracy is over one class: alone it can reach 100% by always answering that class. Which
    institutions do depends on the seed where label mixes are drawn, so each is named with how
    many of its runs."""
    if "classes" not in institutions or institutions.empty:
        return None
    keys = ["institution", "seed"] if "seed" in institutions else ["institution"]
    runs = institutions.dropna(subset=["classes"]).drop_duplicates(keys)  # the schemes of a seed share its data
    per = runs.assign(one=runs["classes"] == 1).groupby("institution", sort=False)["one"].agg(["sum", "size"])
    per = per[per["sum"] > 0]
    if per.empty:
        return None
    what = "seeds" if "seed" in institutions else "runs"
    named = [name if k == n else f"{name} (in {k} of {n} {what})" for name, (k, n) in per.iterrows()]
    one = len(named) == 1
    return (f"{spoken(named)} {'holds' if one else 'hold'} a single class in {'its' if one else 'their'} training "
            f"data: {'its' if one else 'their'} accuracy there is over one class only, so training alone can score "
            "100% by always answering it")


def unmoved(metrics: pd.DataFrame) -> str | None:
    """The sentence for runs whose models never changed (every scored round scores exactly as the starting model),
    else None: nobody trained (no update arrived) or every update was thrown away, so its accuracy is the start's."""
    loss = metrics[(metrics["metric"] == "loss") & (metrics["institution"] != "global")] if len(metrics) else metrics
    if loss.empty:
        return None
    still = loss.groupby(["run_id", "institution"])["value"].agg(lambda v: len(v) > 1 and v.nunique() == 1)
    runs = still.groupby(level="run_id").all()
    if not runs.any():
        return None
    schemes = metrics[metrics["run_id"].isin(runs[runs].index)]["scheme"].dropna().unique()
    what = f"{int(runs.sum())} of {len(runs)} runs ({spoken(sorted(map(str, schemes)))})" if len(runs) > 1 else "the run"
    return (f"in {what} no model ever moved: every round scores exactly as the starting model, so nobody's update "
            "was merged (none arrived, or all were discarded); its accuracies are those of the untrained model")


def without_labels(config: Mapping[str, Any]) -> str | None:
    """The sentence for views of the same entities (``data.views``), else None: only the label holder has a model and
    a score; the other institutions, alone, have no labels and so nothing to train, and their worth is their view's."""
    data = config.get("data") or {}
    if not isinstance(data, Mapping) or not data.get("views"):
        return None
    others = [str(p) for p in data["views"] if p != data.get("label_holder")]
    if not others:
        return None
    one = len(others) == 1
    return (f"{spoken(others)} {'holds' if one else 'hold'} a view of the same entities but no labels: alone "
            f"{'it has' if one else 'they have'} nothing to train, so only {data.get('label_holder')} is scored and "
            "gains; what each view is worth: python -m sim.contribution RUN_DIR (Shapley and leave-one-out over views)")


def caveats(configs: Iterable[Mapping[str, Any]], institutions: pd.DataFrame | None = None,
            metrics: pd.DataFrame | None = None) -> list[str]:
    """Every caveat of these runs, once each, in a fixed order (the runs of one compare usually share them)."""
    out = [invented_institutions(c) for c in configs if isinstance(c, Mapping)]
    out += [without_labels(c) for c in configs if isinstance(c, Mapping)]
    if institutions is not None:
        out.append(single_class(institutions))
    if metrics is not None:
        out.append(unmoved(metrics))
    return list(dict.fromkeys(s for s in out if s))
