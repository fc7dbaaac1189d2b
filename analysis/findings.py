"""Plain-language text for the report: the scenario in words and the main findings.

Each function takes tables of one scenario and returns sentences (plain text, escaped
by the page). They state what the numbers say and nothing the tables do not show.
"""

from __future__ import annotations

import pandas as pd

from analysis.metrics import BASELINE, POOLED, is_federated
from analysis.page import fmt


def _names(items: list[str], limit: int = 4) -> str:
    """'a', 'a and b', 'a, b and c', or the first few and how many more."""
    items = list(items)
    if len(items) > limit:
        items = items[: limit - 1] + [f"{len(items) - limit + 1} more"]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _config_name(config: dict, key: str) -> str | None:
    """The name of a config group (its ``name`` or the last part of its ``_target_``), if recorded."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("name") or str(value.get("_target_", "")).rsplit(".", 1)[-1] or None
    return str(value) if value else None


def describe_scenario(institutions: pd.DataFrame, configs: list[dict], schemes: list[str], seeds: list[int]) -> list[str]:
    """Who collaborates, in words: institutions, disciplines, data shares, skew, compute, and how the runs were set up."""
    inst = institutions.drop_duplicates("institution")
    if inst.empty:
        return ["The runs record no institutions (institutions.parquet is missing)."]
    counts = inst["discipline"].value_counts(sort=False)
    out = [f"{len(inst)} institutions from {len(counts)} discipline{'s' if len(counts) != 1 else ''} take part: "
           + _names([f"{d} ({n})" for d, n in counts.items()], limit=8) + "."]
    share = inst.set_index("institution")["share"].dropna()
    if len(share) > 1 and share.max() > 1.5 * share.min():
        top = share.sort_values(ascending=False)
        out.append(f"Data is spread unevenly: shares range from {fmt(share.min(), 'pct')} ({share.idxmin()}) to "
                   f"{fmt(share.max(), 'pct')} ({share.idxmax()}); the largest {min(3, len(top))} hold "
                   f"{fmt(top.iloc[:3].sum(), 'pct')} of all training data.")
    elif len(share) > 1:
        out.append(f"Data is spread about evenly: each holds about {fmt(share.mean(), 'pct')} of it.")
    skewed = inst[inst["label_skew"].notna()]
    if len(skewed):
        out.append(f"{len(skewed)} hold a lopsided mix of labels ({_names(list(skewed['institution']))}; Dirichlet α "
                   f"{skewed['label_skew'].min():.2g} to {skewed['label_skew'].max():.2g}, smaller is more lopsided).")
    else:
        out.append("Every institution sees the same mix of labels.")
    shifted = inst[inst["feature_skew"].fillna(0) > 0]
    if len(shifted):
        out.append(f"{len(shifted)} see shifted inputs ({_names(list(shifted['institution']))}).")
    gpus = inst["gpus"].fillna(0)
    gpu_text = "none has a GPU" if (gpus == 0).all() else f"{int((gpus > 0).sum())} use GPUs"
    out.append(f"Compute ranges from {inst['cpus'].min():.2g} to {inst['cpus'].max():.2g} CPUs per institution; {gpu_text}.")
    odd = inst[inst["behaviour"].fillna("honest") != "honest"]
    if len(odd):
        out.append("Not every partner behaves: " + _names([f"{r.institution} is {r.behaviour}" for r in odd.itertuples()]) + ".")
    config = configs[0] if configs else {}
    setup = [f"{config['rounds']} rounds" if config.get("rounds") else None,
             f"model {_config_name(config, 'model')}" if _config_name(config, "model") else None,
             f"data {_config_name(config, 'data')}" if _config_name(config, "data") else None]
    setup = [s for s in setup if s]
    seed_text = f"seed{'s' if len(seeds) != 1 else ''} {_names([str(s) for s in seeds], limit=6)}"
    out.append(f"Schemes compared: {_names(schemes, limit=8)}; {seed_text}" + (f"; {', '.join(setup)}." if setup else "."))
    return out


def findings(summary: pd.DataFrame, gains: pd.DataFrame, fairness: pd.DataFrame, costs: pd.DataFrame) -> list[tuple[str, str]]:
    """The main findings as (topic, sentence) pairs: best scheme, who loses, cost, fairness, pooled vs federated, seeds."""
    out: list[tuple[str, str]] = []
    joined = summary[summary["scheme"] != BASELINE].dropna(subset=["mean_gain"])
    if not (summary["scheme"] == BASELINE).any() or joined.empty:
        out.append(("No baseline", "no isolated runs match these runs, so gains over training alone cannot be measured; "
                    "add the isolated scheme with the same scenario and seeds."))
        return out + _pooled_vs_federated(summary) + _seed_note(gains)
    best = joined.loc[joined["mean_gain"].idxmax()]
    alone = summary[summary["scheme"] == BASELINE].iloc[0]
    if best["mean_gain"] > 0:
        out.append(("Highest gain", f"{best['scheme']} gives each institution {fmt(best['mean_gain'], 'pts')} accuracy "
                    f"points on average over training alone (mean accuracy {fmt(best['mean_accuracy'], 'pct')} "
                    f"against {fmt(alone['mean_accuracy'], 'pct')})."))
    else:
        out.append(("No gain", f"no scheme beats training alone on average; the best, {best['scheme']}, changes mean "
                    f"accuracy by {fmt(best['mean_gain'], 'pts')} points."))
    out += _losers(gains)
    out += _cost(best, alone)
    fair = fairness[fairness["scheme"] == best["scheme"]]
    per = gains[gains["scheme"] == best["scheme"]].dropna(subset=["gain"])
    if len(fair) and len(per):
        f = fair.iloc[0]
        better = int((per["gain"] > 0).sum())
        who = f"all {len(per)} institutions are" if better == len(per) else f"{better} of {len(per)} institutions {'is' if better == 1 else 'are'}"
        text = (f"under {best['scheme']}, {who} better off "
                f"and the Gini of their gains is {fmt(f['gain_gini'], 'ratio')} (0 = perfectly even)")
        if pd.notna(f["accuracy_parity"]) and f["worst_discipline"]:
            text += f"; {f['worst_discipline']} trails the best discipline by {fmt(f['accuracy_parity'] * 100, 'pts_abs')} points"
        out.append(("Fairness", text + "."))
    return out + _pooled_vs_federated(summary) + _seed_note(gains)


def _losers(gains: pd.DataFrame) -> list[tuple[str, str]]:
    """Who ends up worse than alone, scheme by scheme, and how sure that is."""
    worse = gains[gains["worse_off"]]
    if worse.empty:
        return [("Who loses", "no institution ends up worse off by joining, under any scheme.")]
    parts = []
    for scheme, w in worse.groupby("scheme", sort=False):
        total = int((gains["scheme"] == scheme).sum())
        worst = w.loc[w["gain"].idxmin()]
        if len(w) > 2:
            parts.append(f"under {scheme}, {len(w)} of {total} institutions (worst: {worst['institution']}, "
                         f"{fmt(worst['gain'], 'pts')} points)")
            continue
        each = []
        for r in w.itertuples():
            sure = ""
            if pd.notna(r.gain_high):
                sure = (f", 95% interval {fmt(r.gain_low, 'pts')} to {fmt(r.gain_high, 'pts')}"
                        + ("" if r.gain_high < 0 else ", so possibly noise"))
            each.append(f"{r.institution} ({fmt(r.gain, 'pts')} points{sure})")
        parts.append(f"under {scheme}, {_names(each)}")
    return [("Who loses by joining", "; ".join(parts) + ".")]


def _cost(best: pd.Series, alone: pd.Series) -> list[tuple[str, str]]:
    """What the best scheme costs in communication compared with training alone."""
    if pd.isna(best["megabytes"]):
        return []
    if not alone["megabytes"] or pd.isna(alone["megabytes"]):
        return [("Cost", f"{best['scheme']} exchanges {fmt(best['megabytes'], 'mb')} MB per run; training alone exchanges nothing.")]
    ratio = best["megabytes"] / alone["megabytes"]
    return [("Cost", f"{best['scheme']} exchanges {fmt(best['megabytes'], 'mb')} MB per run, {ratio:.3g} times the "
             f"{fmt(alone['megabytes'], 'mb')} MB of training alone.")]


def _pooled_vs_federated(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """Whether pooling all data beats the best federated scheme on mean accuracy."""
    pooled = summary[summary["scheme"] == POOLED].dropna(subset=["mean_accuracy"])
    federated = summary[summary["scheme"].map(is_federated)].dropna(subset=["mean_accuracy"])
    if pooled.empty or federated.empty:
        return []
    p, f = pooled.iloc[0], federated.loc[federated["mean_accuracy"].idxmax()]
    diff = (p["mean_accuracy"] - f["mean_accuracy"]) * 100
    if abs(diff) < 0.05:
        verdict = "the same as the best federated scheme"
    else:
        verdict = f"{abs(diff):.1f} points {'above' if diff > 0 else 'below'} the best federated scheme"
    moved = f" ({fmt(p['megabytes'], 'mb')} MB)" if pd.notna(p["megabytes"]) else ""
    return [("Pooled or federated", f"pooling all data reaches {fmt(p['mean_accuracy'], 'pct')} mean accuracy, {verdict} "
             f"({f['scheme']}, {fmt(f['mean_accuracy'], 'pct')}), but the raw data itself leaves the institutions{moved}.")]


def _seed_note(gains: pd.DataFrame) -> list[tuple[str, str]]:
    """How many seeds stand behind the numbers, and what that means for the intervals."""
    if gains.empty:
        return []
    seeds = int(gains["seeds"].min())
    if seeds < 2:
        return [("Certainty", "some schemes ran with a single seed, so their gains have no interval and small "
                 "differences may be noise.")]
    return [("Certainty", f"figures are means over {seeds} or more seeds; intervals are 95% t-intervals.")]
