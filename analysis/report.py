"""The report: one self-contained HTML page, plus every table as CSV and Parquet.

``build_report(run_dirs, out_dir)`` reads the runs (leaving out unfinished ones unless
asked), computes gains, fairness and costs per scenario, draws the plots, writes
``out_dir/report.html`` and ``out_dir/tables/*.{csv,parquet}``, and returns the page's path.
"""

from __future__ import annotations

import html
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis import findings as words
from analysis import metrics as m
from analysis import compute, cost_report, costs, drift, plots, sensitivity, trust
from analysis.page import behaviour_guide, gain_matrix, image, interval_note, interval_text, page, section, table
from analysis.runs import Results, load_results
from sim.core.caveats import caveats
from sim.core.results import write_table, write_text
from sim.core.types import spoken

INSTITUTION_COLUMNS = ["institution", "discipline", "share", "train_samples", "test_samples", "label_skew",
                       "feature_skew", "cpus", "gpus", "behaviour"]
FAIRNESS_COLUMNS = ["scheme", "worst_institution", "worst_gain", "gain_std", "gain_gini", "share_better_off",
                    "accuracy_parity", "worst_discipline"]
SUMMARY_COLUMNS = ["scheme", "seeds", "global_accuracy", "mean_accuracy", "worst_accuracy", "mean_gain",
                   "mean_gain_interval", "worse_off", "significantly_worse_off", "megabytes"]
COST_COLUMNS = ["scheme", "megabytes", "mb_up", "mb_down", "mb_per_member_round", "sim_compute_seconds", "simulated_seconds",
                "simulated_duration", "staleness", "epsilon", "mean_accuracy", "accuracy_per_mb", "pareto"]


def analyse(results: Results, target: float | None = None) -> dict[str, pd.DataFrame]:
    """Every table of the report, computed from the runs' tables (full precision, as exported).

    ``target``: the accuracy time and cost to target are measured at (default: analysis.costs.TARGET_FRACTION of the best).
    """
    mt, lg = results.metrics, results.ledger
    replicates = mt.groupby(["scenario", "scheme", "seed"])["run_id"].nunique()
    if (replicates > 1).any():
        scenario, scheme, seed = replicates[replicates > 1].index[0]
        warnings.warn(f"several runs of {scheme} in scenario {scenario!r} with seed {seed} (a sweep over settings?) "
                      "are averaged as if they were repeats", m.AnalysisWarning, stacklevel=2)
    gains = m.gain_table(mt)
    refs = trust.reference_schemes(results.institutions)
    priced, notes = costs.cost_tables(mt, lg, results.institutions, results.configs, target, set(refs["scheme"]))
    if priced and notes:  # some runs priced, some not: say so; with none priced the section says it once
        warnings.warn(" ".join(notes), m.AnalysisWarning, stacklevel=2)
    summary = m.summary(mt, lg)
    scenario = summary["scenario"] if "scenario" in summary else mt["scenario"].dropna().iloc[0] if len(mt) else None
    key = pd.MultiIndex.from_arrays([pd.Series(scenario, index=summary.index), summary["scheme"]])
    summary["is_reference"] = key.isin(pd.MultiIndex.from_frame(refs)) if len(refs) else False
    return {**priced,
        "summary": summary,
        "gains_per_run": gains,
        "gains": m.gain_summary(gains),
        "fairness": m.fairness_table(mt),
        "costs": m.cost_table(mt, lg),
        "accuracy_per_round": m.round_curve(mt),
        "own_accuracy_per_round": m.round_curve(mt[mt["institution"] != m.GLOBAL]),  # each on its own test split
        "final_values": m.final_table(mt),
        "privacy": trust.privacy_table(mt, lg),
        "damage": trust.damage_table(mt, results.institutions),
        "compute_balance": compute.balance_table(lg),  # compute_share: who lent compute to whom
        "time_saved": compute.saved_table(lg),
        "institutions": _institutions(results.institutions),
        "runs": results.runs,
        "drift": drift.drift_table(gains),
        # Institutions of architectures of their own: each one's model on the global test set, against its own alone
        "global_gains": m.gain_summary(m.gain_table(_on_global_test(mt))),
        "tuned": results.tuned.drop(columns=["values_json"], errors="ignore"),
    }


def _on_global_test(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each institution's scores on the global test set (``global_accuracy``/``global_loss`` rows, which runs keep per
    institution when architectures differ), as if they were its own: the gain machinery then measures them."""
    own = metrics[(metrics["institution"] != m.GLOBAL) & metrics["metric"].isin(["global_accuracy", "global_loss"])]
    return own.assign(metric=own["metric"].str.removeprefix("global_"))


def _institutions(institutions: pd.DataFrame) -> pd.DataFrame:
    """One row per scenario x institution; a behaviour drawn anew for each seed (scenario.behaviours) reads VARIES.

    Runs where every institution is honest (an honest-only reference) do not count as a difference.
    """
    table = institutions.drop_duplicates(["scenario", "institution"]).reset_index(drop=True)
    if "behaviour" in institutions and len(table):
        who = institutions.assign(b=institutions["behaviour"].fillna(trust.HONEST))
        who = who[who.groupby("run_id")["b"].transform(lambda b: (b != trust.HONEST).any())]  # all-honest references aside
        kinds = who.groupby(["scenario", "institution"])["b"]
        said = kinds.first().where(kinds.nunique().eq(1), words.VARIES)  # what runs with misbehaviour say, if one thing
        key = pd.MultiIndex.from_frame(table[["scenario", "institution"]])
        table["behaviour"] = pd.Series(said.reindex(key).to_numpy(), index=table.index).fillna(table["behaviour"])
    return table


def build_report(
    run_dirs: Sequence[Path],
    out_dir: Path,
    contribution: pd.DataFrame | None = None,
    *,
    include_incomplete: bool = False,
    target: float | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/tables/``; return the report's path."""
    out_dir = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", m.AnalysisWarning)
        results = load_results(run_dirs, include_incomplete=include_incomplete)
        tables = analyse(results, target)
    notes = caveats(results.configs.values(), results.institutions, results.metrics)  # what changes their meaning
    notes = list(dict.fromkeys(notes + [str(w.message) for w in caught if issubclass(w.category, m.AnalysisWarning)]))
    for w in caught:  # other warnings (a library's deprecations) are for developers, not the page
        if not issubclass(w.category, m.AnalysisWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if contribution is not None:
        tables["contribution"] = contribution
    sensitive, design_runs = "", set()
    for directory in [d for d in run_dirs if sensitivity.is_design(d)]:  # a sensitivity sweep: indices and maps
        html_part, tables["sensitivity_indices"], runs = sensitivity.section(Path(directory), target)
        sensitive, design_runs = sensitive + html_part, design_runs | runs
    export(tables, out_dir / "tables")
    scenarios = sorted(results.metrics["scenario"].dropna().unique())
    if design_runs:  # each design point is a scenario: its tables are in tables/, its sections would be hundreds
        by_scenario = results.metrics.groupby("scenario")["run_id"].agg(lambda r: set(r) <= design_runs)
        scenarios = [s for s in scenarios if not by_scenario.get(s, False)]
    body = _header(results, contribution is not None, tables, bool(scenarios)) + _warnings(results, notes) + sensitive
    for k, scenario in enumerate(scenarios):
        body += _scenario(scenario, results, tables, tag=f"-{k + 1}" if k else "", several=len(scenarios) > 1)
    if not scenarios and not design_runs:
        body += section("findings", "No results", "<p>None of the given runs is complete, so there is nothing to analyse. "
                        "Wait for them to finish, or pass <code>--include-incomplete</code>.</p>")
    if contribution is not None:
        body += _contribution(contribution, tables)
    body += _runs(results)
    body += ('<footer>Made by collabsim <code>python -m analysis report</code>. Every table is also in the '
             '<code>tables/</code> folder next to this file as CSV and Parquet, at full precision.</footer>')
    path = out_dir / "report.html"
    write_text(page("collabsim report", body), path)
    return path


def export(tables: dict[str, pd.DataFrame], folder: Path) -> None:
    """Write each table as ``<name>.csv`` and ``<name>.parquet`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        write_table(df, folder / f"{name}.parquet")
        write_text(df.to_csv(index=False), folder / f"{name}.csv")


def _header(results: Results, with_contribution: bool, tables: dict[str, pd.DataFrame], per_scenario: bool = True) -> str:
    """Title, what the report covers, and links to its sections."""
    mt = results.metrics
    scenarios = sorted(mt["scenario"].dropna().unique())
    when = datetime.now(timezone.utc).strftime("%d %B %Y, %H:%M UTC")
    counts = [(mt["institution"][mt["institution"] != m.GLOBAL].nunique(), "institution"),
              (mt["scheme"].nunique(), "scheme"), (mt["seed"].nunique(), "seed"), (mt["run_id"].nunique(), "run")]
    sub = (f"Scenario {', '.join(scenarios) or '(none)'} · "
           + " · ".join(f"{n} {word}{'' if n == 1 else 's'}" for n, word in counts) + f" · generated {when}")
    links = [("findings", "Findings"), ("scenario", "Scenario"), ("summary", "Summary"), ("gains", "Who gains"),
             ("fairness", "Fairness"), ("costs", "Costs"), ("rounds", "Over rounds")]
    links[3:3] = ([("tuned", "Tuned settings")] if len(tables["tuned"]) else []) + (  # after the summary, as on the page
        [("drift", "Drift or scenario")] if len(tables["drift"]) else [])
    links[-1:-1] = [("privacy", "Privacy")] if tables["privacy"]["epsilon"].notna().any() else []  # before the rounds
    links[-1:-1] = [("damage", "Damage")] if len(tables["damage"]) else []
    links[-1:-1] = [("compute", "Compute balance")] if len(tables["compute_balance"]) else []
    links = links if per_scenario else []  # only a sensitivity sweep's design points: no per-scenario sections
    links = ([("sensitivity", "What drives who gains")] if "sensitivity_indices" in tables else []) + links
    links += [("contribution", "Contribution")] if with_contribution else []
    links += [("runs", "Runs")]
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in links)
    return (f"<header><h1>Who gains from collaborating?</h1><p class=\"sub\">{html.escape(sub)}</p></header>"
            f"<nav>{nav}</nav>")


def _warnings(results: Results, notes: list[str]) -> str:
    """A red box naming unfinished runs that were left out (or kept), and any caveats met on the way."""
    items = [f"{html.escape(r.directory)} is not complete (state: {html.escape(r.state)}) and was left out."
             for r in results.runs.itertuples() if not r.included]
    items += [f"{html.escape(r.directory)} is not complete (state: {html.escape(r.state)}) but was included on request."
              for r in results.runs.itertuples() if r.included and not r.complete]
    items += [html.escape(n) for n in notes]
    if not items:
        return ""
    return '<div class="warning"><strong>Check before reading:</strong><ul>' + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>"


def _scenario(scenario: str, results: Results, tables: dict[str, pd.DataFrame], tag: str, several: bool) -> str:
    """All sections for one scenario: findings, the scenario, summary, gains, fairness, costs, rounds."""
    pick = {k: v[v["scenario"] == scenario] if "scenario" in v else v for k, v in tables.items() if k != "runs"}
    suffix = f" — {scenario}" if several else ""
    summary = pick["summary"] if "scenario" not in tables["summary"] else pick["summary"].drop(columns="scenario")
    mt = results.metrics[results.metrics["scenario"] == scenario]
    configs = [c for c in results.configs.values() if _config_scenario(c) in (scenario, None)]
    schemes = m.scheme_order(mt["scheme"].dropna())
    gains = ordered_gains(pick["gains"], pick["institutions"])
    refs = words.references(summary)
    described = words.describe_scenario(pick["institutions"], configs, schemes, sorted(mt["seed"].unique()))
    items = "".join(f"<li><strong>{html.escape(topic)}:</strong> {html.escape(text)}</li>"
                    for topic, text in words.tuning_findings(tables["tuned"], list(results.configs.values()))
                    + words.findings(summary, gains, pick["fairness"], pick["costs"])
                    + drift.drift_findings(pick["drift"])
                    + words.privacy_findings(pick["privacy"]) + words.damage_findings(pick["damage"])
                    + cost_report.cost_findings(*_money(pick), refs))
    out = (f'<section id="findings{tag}" class="findings"><h2>Key findings{html.escape(suffix)}</h2>'
           f"<ul>{items}</ul></section>")
    out += section(f"scenario{tag}", "The scenario" + suffix,
                   "<p>" + " ".join(html.escape(s) for s in described) + "</p>"
                   + table(pick["institutions"], [c for c in INSTITUTION_COLUMNS if c in pick["institutions"]]))
    summary = summary.assign(mean_gain_interval=[  # isolated's gain is 0 by definition: no interval to show
        None if scheme == m.BASELINE else interval_text(lo, hi, note) or None
        for scheme, lo, hi, note in zip(summary["scheme"], summary["mean_gain_low"], summary["mean_gain_high"],
                                        summary.get("mean_gain_note", pd.Series(None, index=summary.index)))])
    joined = summary[summary["scheme"] != m.BASELINE]
    with_interval = bool((joined["seeds"] >= m.MIN_SEEDS).any())  # too few seeds everywhere: no column, one note
    shown = [c for c in SUMMARY_COLUMNS if c in summary and (c != "mean_gain_interval" or with_interval)]
    seeds = joined["seeds"] if with_interval else []
    ref_note = (f"{spoken(sorted(refs))} (reference) {'has' if len(refs) == 1 else 'have'} every institution "
                "honest: the yardstick the damage by misbehaving partners is measured against, not a scheme to choose, "
                "so never ranked in the findings." if refs else "")
    out += section(f"summary{tag}", "Summary by scheme" + suffix,
                   table(summary.assign(scheme=words.labelled(summary["scheme"], refs)), shown)
                   + _note(interval_note(seeds) + " " + ref_note),
                   "One row per scheme; figures are means over seeds; isolated is the baseline every gain is measured "
                   "against. " + words.selection_rule(configs))
    out += drift.sections(pick, tag, suffix)  # the settings each scheme was tuned to, and FedAvg's drift or scenario
    if len(gains):
        body = image(plots.png_bytes(plots.gain_plot(gains)), "Gain per institution and scheme",
                     f"Bars: mean gain over seeds; whiskers: 95% interval (with {m.MIN_SEEDS} seeds or more, and only "
                     "where it stays within the gains possible); "
                     "red outline: worse off than alone.")
        body += gain_matrix(gains)
        body += _note("Each cell: mean gain in accuracy points over seeds, on each institution's own test split, and "
                      f"below it the 95% t-interval when there are {m.MIN_SEEDS} seeds or more ('too uncertain' where it "
                      "would reach gains no accuracy can give). Red: worse off than "
                      "training alone. Changes in loss are in tables/gains.csv. " + interval_note(gains["seeds"]))
        out += section(f"gains{tag}", "Who gains, who loses" + suffix, body,
                       "Each institution's accuracy under a scheme minus its accuracy when training alone.")
    on_global = ordered_gains(pick["global_gains"], pick["institutions"]) if len(pick["global_gains"]) else []
    if len(on_global):
        out += section(f"global-gains{tag}", "Each institution's model on the global test set" + suffix,
                       gain_matrix(on_global) + _note(
                           "Each cell: the mean gain in accuracy points over seeds of the model each institution ends "
                           "with, scored on the global test set (the union of every institution's test split), over "
                           "its own model trained alone, and the 95% t-interval below it. " + interval_note(
                               on_global["seeds"])),
                       "Institutions that train architectures of their own: does the consortium's knowledge reach "
                       "each one's own model, on data it never held?")
    out += section(f"fairness{tag}", "Fairness of the gains" + suffix, table(pick["fairness"], FAIRNESS_COLUMNS),
                   "Are the gains shared evenly, and do some disciplines end up behind?")
    costs = pick["costs"].assign(mb_up=lambda d: d["bytes_up"] / 1e6, mb_down=lambda d: d["bytes_down"] / 1e6)
    cost_cols = [c for c in COST_COLUMNS if c not in ("epsilon", "staleness", "sim_compute_seconds") or costs[c].notna().any()]
    out += section(f"costs{tag}", "What it costs" + suffix,
                   image(plots.png_bytes(plots.pareto_plot(costs)), "Mean accuracy against MB exchanged",
                         "A scheme is on the Pareto front when no other is both more accurate and cheaper to communicate. "
                         "Markers that would cover each other are set side by side; the table has the exact values.")
                   + table(costs, cost_cols) + cost_report.money_section(*_money(pick), refs),
                   "Communication, compute, time and money per run, mean over seeds.")
    out += _privacy(pick["privacy"], tag, suffix) + _damage(pick["damage"], tag, suffix)
    out += compute.compute_section(pick["compute_balance"], pick["time_saved"], tag, suffix)
    curve, own = pick["accuracy_per_round"], pick["own_accuracy_per_round"]
    if len(curve) or len(own):
        out += section(f"rounds{tag}", "Accuracy over rounds" + suffix,
                       image(plots.png_bytes(plots.accuracy_plot(curve, own)), "Accuracy per round and scheme",
                             "Lines: mean over seeds; whiskers: lowest to highest seed. Left: the global test set; a "
                             "scheme without one merged model (isolated, personalised schemes) is scored there by the "
                             "mean of every institution's own model, which explains its low figure. Right: each "
                             "institution on its own test split, the figure gains are measured on. Schemes are drawn a "
                             "few points apart at each round so that equal curves stay visible."))
    return out


def ordered_gains(gains: pd.DataFrame, institutions: pd.DataFrame) -> pd.DataFrame:
    """The gains table with schemes in reading order and institutions in the scenario's order (as the report shows it)."""
    order = {name: i for i, name in enumerate(dict.fromkeys(institutions["institution"]))}
    gains = gains.assign(_at=lambda d: d["institution"].map(order)).sort_values("_at", kind="stable")
    return m.order_rows(gains.drop(columns="_at"))


def _money(pick: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One scenario's money, who-pays and target tables (empty when its runs carry no cost model)."""
    return tuple(pick.get(k, pd.DataFrame()) for k in ("money", "money_per_institution", "targets"))


def _privacy(privacy: pd.DataFrame, tag: str, suffix: str) -> str:
    """Accuracy against epsilon, when some run spends a privacy budget ('' otherwise)."""
    if privacy.empty or privacy["epsilon"].isna().all():
        return ""
    body = image(plots.png_bytes(plots.privacy_plot(privacy)), "Mean accuracy against privacy budget epsilon",
                 "Schemes with privacy noise at the epsilon they spent; schemes that share updates without noise at "
                 "'no guarantee'; isolated shares nothing.")
    body += table(privacy, ["scheme", "epsilon", "seeds", "mean_accuracy", "global_accuracy"])
    body += _note(trust.PRIVACY_COVERS)
    return section(f"privacy{tag}", "What privacy costs" + suffix, body + _note(interval_note(privacy["seeds"])),
                   "Differential privacy bounds what any one institution's participation reveals, by epsilon (smaller "
                   "is more private, at delta of the scheme's config); the noise that buys it costs accuracy.")


def _damage(damage: pd.DataFrame, tag: str, suffix: str) -> str:
    """The damage misbehaving institutions do under each scheme, when some misbehave ('' otherwise)."""
    if damage.empty:
        return ""
    behaviours = [c for c in damage.columns if c.startswith("gain_")]
    columns = ["scheme", "seeds", "misbehaving", "honest_accuracy", "reference", "reference_accuracy", "kept", "damage",
               *behaviours, *(["backdoor_success"] if damage["backdoor_success"].notna().any() else [])]
    note = ("" if damage["reference"].notna().any() else "No run has every institution honest, so there is no reference: "
            "add one, e.g. +variants.fedavg_honest=['scheme=fedavg','scenario.behaviours=null'].")
    return section(f"damage{tag}", "Damage by misbehaving partners" + suffix,
                   table(damage, [c for c in columns if c in damage], extra=behaviour_guide(behaviours)) + _note(note),
                   "What the honest institutions keep of the accuracy they reach when nobody cheats, under each merge "
                   "rule, and what the misbehaving ones gain over training alone.")


def _note(text: str) -> str:
    """A small note under a table or figure ('' for no text)."""
    return f'<p class="note">{html.escape(text.strip())}</p>' if text.strip() else ""


def _config_scenario(config: dict) -> str | None:
    """The scenario name a run's config records, if any."""
    scenario = config.get("scenario")
    return scenario.get("name") if isinstance(scenario, dict) else scenario


def _contribution(contribution: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> str:
    """The contribution chart and table: Shapley and leave-one-out next to data share and gain."""
    inst = tables["institutions"]
    fig = plots.contribution_plot(contribution, inst, tables["gains"])
    shown = contribution.merge(inst.drop_duplicates("institution")[["institution", "share"]], on="institution", how="left")
    body = image(plots.png_bytes(fig), "Contribution per institution",
                 "Shapley value (whiskers: error bound), data share, and gain under the scheme with the highest mean gain.")
    body += table(shown, ["institution", "shapley", "shapley_bound", "loo", "share", "method"])
    return section("contribution", "Who contributes", body,
                   "How much each institution adds to the merged model's accuracy on the global test set.")


def _runs(results: Results) -> str:
    """Every run directory read, its state, and whether it counts."""
    runs = results.runs
    return section("runs", "Runs in this report",
                   table(runs, ["directory", "state", "included", "schemes", "seed_values"],
                         row_class=["" if i else "excluded" for i in runs["included"]]))
