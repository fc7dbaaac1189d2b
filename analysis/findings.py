"""Plain-language text for the report: the scenario in words and the main findings.

Each function takes tables of one scenario and returns sentences (plain text, escaped
by the page). They state what the numbers say and nothing the tables do not show.
"""

from __future__ import annotations

import pandas as pd

from analysis.certainty import significance, sureness, tally
from analysis.metrics import BASELINE, MIN_SEEDS, POOLED, is_federated
from analysis.page import TOO_FEW_SEEDS, fmt, interval_text
from sim.core.types import spoken


VARIES = "differs by seed"
"""The behaviour column of an institution whose behaviour the seed draws (a share of a generated population)."""


def _config_name(config: dict, key: str) -> str | None:
    """The name of a config group (its ``name`` or the last part of its ``_target_``), if recorded."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("name") or str(value.get("_target_", "")).rsplit(".", 1)[-1] or None
    return str(value) if value else None


SELECTION = {
    "last": "the last round",
    "best_val": "for each institution, the round whose model scores highest on its own validation split (for the "
                "global test set, on the union of the validation splits); test data never choose the round",
}


def selection_rule(configs: list[dict]) -> str:
    """One sentence on which round's model the accuracies are read from (``results.select`` of the runs' configs)."""
    rules = sorted({str((c.get("results") or {}).get("select") or "last") for c in configs if isinstance(c, dict)}) or ["last"]
    said = [f"{SELECTION.get(r, r)} (results.select={r})" for r in rules]
    if len(said) == 1:
        return f"Every accuracy and gain is read at the selected round: {said[0]}."
    return "Every accuracy and gain is read at the selected round, which these runs choose differently: " + "; ".join(said) + "."


def describe_scenario(institutions: pd.DataFrame, configs: list[dict], schemes: list[str], seeds: list[int]) -> list[str]:
    """Who collaborates, in words: institutions, disciplines, data shares, skew, compute, and how the runs were set up."""
    inst = institutions.drop_duplicates("institution")
    if inst.empty:
        return ["The runs record no institutions (institutions.parquet is missing)."]
    counts = inst["discipline"].value_counts(sort=False)
    out = [f"{len(inst)} institutions from {len(counts)} discipline{'s' if len(counts) != 1 else ''} take part: "
           + spoken([f"{d} ({n})" for d, n in counts.items()], limit=8) + "."]
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
        out.append(f"{len(skewed)} hold a lopsided mix of labels ({spoken(list(skewed['institution']))}; Dirichlet α "
                   f"{skewed['label_skew'].min():.2g} to {skewed['label_skew'].max():.2g}, smaller is more lopsided).")
    else:
        out.append("Every institution sees the same mix of labels.")
    shifted = inst[inst["feature_skew"].fillna(0) > 0]
    if len(shifted):
        out.append(f"{len(shifted)} see shifted inputs ({spoken(list(shifted['institution']))}).")
    gpus = inst["gpus"].fillna(0)
    gpu_text = "none has a GPU" if (gpus == 0).all() else f"{int((gpus > 0).sum())} use GPUs"
    out.append(f"Compute ranges from {inst['cpus'].min():.2g} to {inst['cpus'].max():.2g} CPUs per institution; {gpu_text}.")
    odd = inst[inst["behaviour"].fillna("honest") != "honest"]
    fixed, drawn = odd[odd["behaviour"] != VARIES], odd[odd["behaviour"] == VARIES]
    if len(fixed):
        out.append("Not every partner behaves: " + spoken([f"{r.institution} is {r.behaviour}" for r in fixed.itertuples()]) + ".")
    if len(drawn):
        out.append(f"Which institutions misbehave is drawn anew for each seed (scenario.behaviours): {len(drawn)} of "
                   f"{len(inst)} do so in some seed, so their behaviour reads '{VARIES}'.")
    config = configs[0] if configs else {}
    setup = [f"{config['rounds']} rounds" if config.get("rounds") else None,
             f"model {_config_name(config, 'model')}" if _config_name(config, "model") else None,
             f"data {_config_name(config, 'data')}" if _config_name(config, "data") else None]
    setup = [s for s in setup if s]
    seed_text = f"seed{'s' if len(seeds) != 1 else ''} {spoken([str(s) for s in seeds], limit=6)}"
    out.append(f"Schemes compared: {spoken(schemes, limit=8)}; {seed_text}" + (f"; {', '.join(setup)}." if setup else "."))
    return out


def institutions_phrase(k: int, n: int, verb: str, verb_one: str | None = None) -> str:
    """How many of n institutions do something, with the right quantifier: 'all 6 ... gain', '2 of 6 ... gain', 'none ...'.

    'all' (or 'the only institution') only when every one of the n does; never 'each' for
    fewer. ``verb`` agrees with a plural subject, ``verb_one`` (default verb + 's') with one.
    """
    one = verb_one or verb + "s"
    if k == 0:
        return f"no institution {one}" if n == 1 else f"none of the {n} institutions {one}"
    if n == 1:
        return f"the only institution {one}"
    if k == n:
        return f"all {n} institutions {verb}"
    return f"{k} of {n} institutions {one if k == 1 else verb}"


REFERENCE = "reference"
"""How a reference run (the trust experiment's run with nobody cheating) is labelled wherever schemes are listed."""


def references(summary: pd.DataFrame) -> set[str]:
    """Schemes the summary marks ``is_reference``: yardsticks for the others, never schemes to choose."""
    if "is_reference" not in summary:
        return set()
    return set(summary.loc[summary["is_reference"].fillna(False).astype(bool), "scheme"])


def ranked(table: pd.DataFrame, refs: set[str]) -> pd.DataFrame:
    """The rows of schemes that may be ranked: every scheme but the references."""
    return table[~table["scheme"].isin(refs)] if refs and "scheme" in table else table


def labelled(schemes: pd.Series, refs: set[str]) -> pd.Series:
    """Scheme names for a table, a reference's marked '(reference)'."""
    return schemes.map(lambda s: f"{s} ({REFERENCE})" if s in refs else s)


def _signs(rows: pd.DataFrame) -> list[int]:
    """:func:`analysis.certainty.significance` of each institution's gain."""
    return [significance(lo, hi) for lo, hi in zip(rows["gain_low"], rows["gain_high"])]


def _interval_said(low, high, note) -> str:
    """'95% interval a to b' or why there is none ('too few seeds (n < 3)', 'too uncertain: ...')."""
    text = interval_text(low, high, note)
    return f"95% interval {text}" if pd.notna(low) and pd.notna(high) else text


def findings(summary: pd.DataFrame, gains: pd.DataFrame, fairness: pd.DataFrame, costs: pd.DataFrame) -> list[tuple[str, str]]:
    """The main findings as (topic, sentence) pairs: best scheme, who loses, cost, fairness, pooled vs federated, seeds.

    ``summary`` is :func:`analysis.metrics.summary` and ``gains`` :func:`analysis.metrics.gain_summary`
    of one scenario. A mean gain is always called a mean ("on average"); how many
    institutions gain is counted from ``gains``, so an average lifted by a few is never
    read as a gain for each. One certainty rule (:mod:`analysis.certainty`): a gain or loss is
    stated as a fact only when its 95% interval excludes zero; otherwise it is counted with how
    many are significant ("2 of 6 institutions are worse off, none significantly"). Reference
    runs (``is_reference``) are never ranked.
    """
    out: list[tuple[str, str]] = []
    refs = references(summary)
    summary, gains = ranked(summary, refs), ranked(gains, refs)
    joined = summary[summary["scheme"] != BASELINE].dropna(subset=["mean_gain"])
    if not (summary["scheme"] == BASELINE).any() or joined.empty:
        out.append(("No baseline", "no isolated runs match these runs, so gains over training alone cannot be measured; "
                    "add the isolated scheme with the same scenario and seeds."))
        return out + _pooled_vs_federated(summary) + _seed_note(summary, gains)
    best = joined.loc[joined["mean_gain"].idxmax()]
    alone = summary[summary["scheme"] == BASELINE].iloc[0]
    per = gains[gains["scheme"] == best["scheme"]].dropna(subset=["gain"])
    n = len(per)
    gaining, losing = per[per["gain"] > 0], per[per["worse_off"].astype(bool)]
    low, high, note = best.get("mean_gain_low"), best.get("mean_gain_high"), best.get("mean_gain_note")
    sure = significance(low, high)
    said = _interval_said(low, high, note)
    accuracy = f"mean accuracy {fmt(best['mean_accuracy'], 'pct')} against {fmt(alone['mean_accuracy'], 'pct')}"
    counted = f"; {tally(_signs(gaining), n, 'gain')}" if n else ""
    if len(losing):
        counted += f"; {tally(_signs(losing), n, 'are worse off', 'is worse off')}"
    if best["mean_gain"] > 0 and sure > 0:
        text = (f"{best['scheme']} gains the most on average: {fmt(best['mean_gain'], 'pts')} accuracy points over "
                f"training alone ({accuracy}; {said}){counted}")
        if len(losing) > n / 2:
            surely = sum(1 for x in _signs(losing) if x < 0) > n / 2
            text += ", so the average comes from a few" + (" and most institutions lose by joining" if surely else "")
        out.append(("Highest mean gain", text + "."))
    elif best["mean_gain"] > 0:
        text = (f"{best['scheme']} has the highest mean gain, {fmt(best['mean_gain'], 'pts')} accuracy points over "
                f"training alone ({accuracy}), but it is "
                + (f"not significant: its 95% interval, {interval_text(low, high)}, includes zero" if pd.notna(low)
                   else sureness(low, high, note)) + counted)
        out.append(("Highest mean gain", text + "."))
    else:
        text = (f"no scheme beats training alone on average; the best, {best['scheme']}, changes mean accuracy by {fmt(best['mean_gain'], 'pts')} "
                f"points ({said}; {sureness(low, high, note).split(':')[0]}){counted}")
        out.append(("No gain on average", text + "."))
    out += _losers(gains)
    out += _cost(best, alone)
    fair = fairness[fairness["scheme"] == best["scheme"]]
    if len(fair) and n:
        f = fair.iloc[0]
        text = (f"under {best['scheme']}, {tally(_signs(gaining), n, 'are better off', 'is better off')}, "
                f"and the Gini of their gains is {fmt(f['gain_gini'], 'ratio')} (0 = perfectly even)")
        if pd.notna(f["accuracy_parity"]) and f["worst_discipline"]:
            text += f"; {f['worst_discipline']} trails the best discipline by {fmt(f['accuracy_parity'] * 100, 'pts_abs')} points"
        out.append(("Fairness", text + "."))
    return out + _pooled_vs_federated(summary) + _seed_note(summary, gains)


def _losers(gains: pd.DataFrame) -> list[tuple[str, str]]:
    """Who ends up worse than alone, scheme by scheme, counted with how many of them are significantly worse off."""
    worse = gains[gains["worse_off"].astype(bool)]
    if worse.empty:
        return [("Who loses by joining", "no institution ends up worse off by joining, under any scheme.")]
    parts = []
    for scheme, w in worse.groupby("scheme", sort=False):
        total = int(gains[gains["scheme"] == scheme]["gain"].notna().sum())
        counted = tally(_signs(w), total, "are worse off", "is worse off")
        if len(w) > 2:
            worst = w.loc[w["gain"].idxmin()]
            parts.append(f"under {scheme}, {counted} (worst: {worst['institution']}, {fmt(worst['gain'], 'pts')} points, "
                         f"{_interval_said(worst['gain_low'], worst['gain_high'], worst.get('gain_note'))})")
            continue
        each = [f"{r['institution']} ({fmt(r['gain'], 'pts')} points, "
                f"{_interval_said(r['gain_low'], r['gain_high'], r.get('gain_note'))})" for _, r in w.iterrows()]
        parts.append(f"under {scheme}, {counted}: {spoken(each)}")
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
    federated = ranked(summary, references(summary))
    federated = federated[federated["scheme"].map(is_federated)].dropna(subset=["mean_accuracy"])
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


def _seed_note(summary: pd.DataFrame, gains: pd.DataFrame) -> list[tuple[str, str]]:
    """How many seeds stand behind the numbers, and whether there are intervals (only from MIN_SEEDS seeds)."""
    seeds = summary["seeds"] if "seeds" in summary else gains.get("seeds", pd.Series(dtype=float))
    seeds = pd.Series(seeds, dtype="float64").dropna()
    if seeds.empty:
        return []
    low, high = int(seeds.min()), int(seeds.max())
    count = f"{low} seed{'s' if low != 1 else ''}" if low == high else f"{low} to {high} seeds"
    if low >= MIN_SEEDS:
        return [("Certainty", f"figures are means over {count}; intervals are 95% t-intervals over seeds, shown only "
                 "where they stay within what is possible ('too uncertain' otherwise), and a gain or loss is called "
                 "significant only when its interval excludes zero.")]
    return [("Certainty", f"figures are means over {count}: {TOO_FEW_SEEDS}"
             + (f" where there are fewer than {MIN_SEEDS}" if high >= MIN_SEEDS else "")
             + ", so no gain or loss there is significant and small differences may be noise.")]


def count_phrase(k: int, n: int, noun: str, verb: str, verb_one: str | None = None) -> str:
    """'all 3 merge rules keep', '1 of 3 merge rules keeps', 'none of the 3 merge rules keeps': counted, never 'each' for fewer."""
    one = verb_one or verb + "s"
    if k == 0:
        return f"no {noun} {one}" if n == 1 else f"none of the {n} {noun}s {one}"
    if n == 1:
        return f"the only {noun} {one}"
    return f"all {n} {noun}s {verb}" if k == n else f"{k} of {n} {noun}s {one if k == 1 else verb}"


def _of(k: int, n: int, noun: str) -> str:
    """'all 5 schemes', '2 of 5 schemes', 'none of the 5 schemes', 'the only scheme', 'no scheme'."""
    if n == 1:
        return f"the only {noun}" if k else f"no {noun}"
    return f"none of the {n} {noun}s" if k == 0 else f"all {n} {noun}s" if k == n else f"{k} of {n} {noun}s"


def privacy_findings(privacy: pd.DataFrame) -> list[tuple[str, str]]:
    """What privacy costs: the most accurate run with a guarantee, the strictest budget, and the best without one."""
    if privacy.empty or privacy["epsilon"].isna().all():
        return []
    private = privacy.dropna(subset=["epsilon", "mean_accuracy"])
    best = private.loc[private["mean_accuracy"].idxmax()]
    strict = private.loc[private["epsilon"].idxmin()]
    text = (f"with a privacy guarantee, the most accurate is {best['scheme']} at ε = {best['epsilon']:g} "
            f"({fmt(best['mean_accuracy'], 'pct')} mean accuracy)")
    if strict.name != best.name:
        text += f"; at the strictest budget, ε = {strict['epsilon']:g}, {strict['scheme']} reaches {fmt(strict['mean_accuracy'], 'pct')}"
    loose = privacy[privacy["epsilon"].isna() & privacy["scheme"].map(is_federated)].dropna(subset=["mean_accuracy"])
    if len(loose):
        top = loose.loc[loose["mean_accuracy"].idxmax()]
        text += (f"; without a guarantee, {top['scheme']} reaches {fmt(top['mean_accuracy'], 'pct')}, "
                 f"{fmt((top['mean_accuracy'] - best['mean_accuracy']) * 100, 'pts')} points against the best private run")
    alone = privacy[privacy["scheme"] == BASELINE].dropna(subset=["mean_accuracy"])
    if len(alone):
        a = alone["mean_accuracy"].mean()
        above = int((private["mean_accuracy"] > a).sum())
        text += (f"; {count_phrase(above, len(private), 'private run', 'beat', 'beats')} training alone "
                 f"({fmt(a, 'pct')})")
    return [("What privacy costs", text + ".")]


KEEP = 0.95
"""Share of the reference accuracy a merge rule must keep to count as withstanding the misbehaving institutions."""


def damage_findings(damage: pd.DataFrame) -> list[tuple[str, str]]:
    """How much misbehaving institutions hurt the honest ones under each scheme, and what the misbehaving gain."""
    if damage.empty:
        return []
    out = []
    rated = damage.dropna(subset=["kept"])
    if len(rated):
        held = rated[rated["kept"] >= KEEP]
        worst = rated.loc[rated["kept"].idxmin()]
        text = (f"against {rated['reference'].iloc[0]} (nobody cheating), "
                f"{count_phrase(len(held), len(rated), 'scheme', 'keep', 'keeps')} at least {KEEP:.0%} of the honest "
                f"institutions' accuracy")
        if len(held):
            text += f" ({spoken(list(held['scheme']))})"
        text += f"; {worst['scheme']} keeps the least, {fmt(worst['kept'], 'pct')} ({fmt(worst['damage'], 'pts')} points)"
        out.append(("Damage by misbehaving partners", text + "."))
    else:
        out.append(("Damage by misbehaving partners", "no run has every institution honest, so the damage cannot be "
                    "measured; add a reference run with nobody misbehaving."))
    parts = []
    for column in [c for c in damage.columns if c.startswith("gain_")]:
        g = damage.dropna(subset=[column])
        if g.empty:
            continue
        top = g.loc[g[column].idxmax()]
        gaining = int((g[column] > 0).sum())
        text = f"institutions behaving as {column[5:]} gain over training alone under {_of(gaining, len(g), 'scheme')}"
        parts.append(text + (f" (most under {top['scheme']}, {fmt(top[column], 'pts')} points on average)" if gaining else ""))
    if parts:
        out.append(("What misbehaving pays", "; ".join(parts) + "."))
    return out


def tuning_findings(tuned: pd.DataFrame, configs: list[dict]) -> list[tuple[str, str]]:
    """Plainly, whether the schemes were tuned: which settings were chosen, on what, and that test data never chose them.

    ``tuned`` is a tuned compare's tuned.csv; ``configs`` the runs' configs (a compare's records ``tune``). Nothing
    is said for runs that are no compare (a run, a sweep), where no budget was shared.
    """
    if len(tuned):
        n, seeds = int(tuned["trials"].max()), sorted({int(s) for s in tuned.get("seed", pd.Series(dtype=int)).dropna()})
        on = f" on seed {spoken([str(s) for s in seeds])}" if seeds else ""
        chosen = [f"{r.scheme}: {r.settings}" + (" (its config settings)" if r.chosen_trial == 0 else "")
                  + f", validation accuracy {fmt(r.val_score, 'pct')} against {fmt(r.config_val_score, 'pct')} at its "
                  "config settings" for r in tuned.itertuples()]
        return [("Tuned schemes", f"each scheme had the same budget of {n} Ray Tune trials of its own settings{on}, "
                 "chosen on the institutions' validation accuracy only; test data never chose them. Chosen: "
                 + "; ".join(chosen) + ".")]
    if any(isinstance(c, dict) and "tune" in c for c in configs):
        return [("Tuned schemes", "none: every scheme ran at its config settings (tune=0), so a scheme may lose for "
                 "want of its own learning rate or epochs; python -m sim.compare tune=N gives each scheme the same "
                 "budget of N trials of its own settings, chosen on validation data.")]
    return []
