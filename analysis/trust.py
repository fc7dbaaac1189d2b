"""What privacy costs and what misbehaving partners do: the report's privacy and damage tables.

Same units as :mod:`analysis.metrics` (accuracies as fractions, gains in points); both tables
are empty when no run spent privacy budget or no institution misbehaved, and the report then
leaves their sections out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.metrics import (
    GLOBAL, RUN, final_table, gain_table, institution_finals, is_federated, mean_interval, order_rows, run_accuracy,
    run_costs,
)

PRIVACY_COVERS = (
    "What the guarantee covers. Client-level privacy (privacy=client_dp, scheme=dp_fedavg): each institution's "
    "clipped model change, every institution weighted 1 (no sample count is used), with the noise added by the "
    "coordinator, which must therefore be trusted. Sample-level DP-SGD (an institution's dp_noise_multiplier): the "
    "model it sends. Outside the guarantee, and sent as they are: its number of training samples, which FedAvg weights "
    "by (treated as public, as DP-SGD's own sampling rate q = batch size / samples is; scheme.weighting=uniform uses "
    "none), and under q-FFL the loss of the received model on its data, which q-FFL's step needs. The training loss "
    "in the tables is the simulator's record for you: no scheme reads it, and it is not counted as sent.")
"""What leaves an institution under each kind of privacy, covered or not: printed under the report's privacy table."""

HONEST = "honest"
"""The behaviour of an institution that does what it claims (institutions.parquet's ``behaviour``)."""


def reference_schemes(institutions: pd.DataFrame) -> pd.DataFrame:
    """Per scenario where some run has a misbehaving institution, the reference: the federated scheme whose runs have
    every institution honest (a label starting with fedavg first, e.g. the trust experiment's ``fedavg_honest``).

    It is what :func:`damage_table` measures the damage against. A reference is a yardstick, not a scheme one could
    choose (nobody makes partners honest by picking it), so the report labels it and never ranks it.
    """
    columns = ["scenario", "scheme"]
    if institutions.empty or "behaviour" not in institutions:
        return pd.DataFrame(columns=columns)
    who = institutions.assign(cheat=institutions["behaviour"].fillna(HONEST) != HONEST)
    cheating_run = who.groupby(["scenario", "scheme", "run_id"])["cheat"].any()
    clean = ~cheating_run.groupby(level=["scenario", "scheme"]).any()
    rows = []
    for scenario, per_scheme in clean.groupby(level="scenario"):
        if per_scheme.all():
            continue  # nobody misbehaves in this scenario: no damage to measure, no reference
        names = sorted((s for (_, s), ok in per_scheme.items() if ok and is_federated(s)),
                       key=lambda s: (not s.startswith("fedavg"), s))
        rows += [(scenario, names[0])] if names else []
    return pd.DataFrame(rows, columns=columns)


def privacy_table(metrics: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """Accuracy against privacy budget: one row per scenario x scheme x epsilon (mean over seeds), empty when no run has epsilon.

    Epsilon is each run's largest spend (:func:`run_costs`), rounded to 3 significant figures
    so that seeds of one budget group together; runs of one scheme label at several budgets (a
    sweep over ``scheme.target_epsilon``) make several rows. Schemes without privacy noise keep
    epsilon NaN: no formal guarantee. ``low``/``high`` bound the mean accuracy's 95% interval.
    """
    columns = ["scenario", "scheme", "epsilon", "seeds", "mean_accuracy", "mean_accuracy_low", "mean_accuracy_high",
               "global_accuracy"]
    costs = run_costs(ledger)
    if ledger.empty or costs["epsilon"].isna().all():
        return pd.DataFrame(columns=columns)
    per_run = run_accuracy(metrics).merge(costs[["run_id", "epsilon"]], on="run_id", how="left")
    per_run["epsilon"] = per_run["epsilon"].map(lambda e: float(f"{e:.3g}") if pd.notna(e) else np.nan)
    rows = []
    for (scenario, scheme, epsilon), g in per_run.groupby(["scenario", "scheme", "epsilon"], sort=False, dropna=False):
        mean, low, high = mean_interval(g["mean_accuracy"], lowest=0.0, highest=1.0)  # an accuracy lies in [0, 1]
        rows.append({"scenario": scenario, "scheme": scheme, "epsilon": epsilon, "seeds": int(g["seed"].nunique()),
                     "mean_accuracy": mean, "mean_accuracy_low": low, "mean_accuracy_high": high,
                     "global_accuracy": g["global_accuracy"].mean()})
    table = order_rows(pd.DataFrame(rows, columns=columns))
    return table.sort_values(["scenario", "epsilon"], kind="stable", na_position="last").reset_index(drop=True)


def damage_table(metrics: pd.DataFrame, institutions: pd.DataFrame) -> pd.DataFrame:
    """What misbehaving institutions do to the honest ones under each scheme, and what they gain themselves.

    One row per scenario x federated scheme whose runs include a misbehaving institution (institutions.parquet's
    ``behaviour`` other than honest). ``honest_accuracy`` is the mean final accuracy of that
    run's honest institutions on their own test splits; ``reference_accuracy`` is the same
    institutions' accuracy, same scenario and seed, under the reference: a federated scheme
    whose runs have every institution honest (a label starting with fedavg first, e.g.
    ``fedavg_honest``), named in ``reference``; blank when there is none. ``kept`` is their
    ratio, ``damage`` their difference in accuracy points. ``gain_<behaviour>`` is the mean gain
    over isolated (points) of the institutions with that behaviour. ``backdoor_success`` is the merged model's
    attack success rate on the triggered global test set (a data-poisoning institution's backdoor; NaN without
    one). Means are over seeds.
    """
    if institutions.empty or "behaviour" not in institutions:
        return pd.DataFrame()
    who = institutions[[*RUN, "institution", "behaviour"]].assign(behaviour=lambda d: d["behaviour"].fillna(HONEST))
    cheating = who.groupby("run_id")["behaviour"].agg(lambda b: bool((b != HONEST).any()))
    if not cheating.any():
        return pd.DataFrame()
    finals = institution_finals(metrics).merge(who[["run_id", "institution", "behaviour"]], on=["run_id", "institution"],
                                               how="left").fillna({"behaviour": HONEST})
    clean = finals[finals["run_id"].map(cheating).eq(False) & finals["scheme"].map(is_federated)]
    reference = reference_schemes(institutions)
    behaviours = sorted(b for b in who["behaviour"].unique() if b != HONEST)
    gains = gain_table(metrics).merge(who[["run_id", "institution", "behaviour"]], on=["run_id", "institution"], how="left")
    rows = []
    final = final_table(metrics)
    glob = final[final["institution"] == GLOBAL]  # the merged model's attack success rate (data poisoning), per run
    bad = finals[finals["run_id"].map(cheating).eq(True) & finals["scheme"].map(is_federated)]
    for (scenario, scheme), f in bad.groupby(["scenario", "scheme"], sort=False):
        refs = clean[clean["scenario"] == scenario]
        names = list(reference.loc[reference["scenario"] == scenario, "scheme"])
        ref = refs[refs["scheme"] == names[0]] if names else refs
        honest = f[f["behaviour"] == HONEST]
        per_seed = honest.groupby("seed")["accuracy"].mean()
        matched = ref.merge(honest[["seed", "institution"]], on=["seed", "institution"])
        ref_seed = matched.groupby("seed")["accuracy"].mean().reindex(per_seed.index)
        row = {"scenario": scenario, "scheme": scheme, "seeds": int(f["seed"].nunique()),
               "misbehaving": int((f["behaviour"] != HONEST).sum() / max(1, f["run_id"].nunique())),
               "honest_accuracy": per_seed.mean(), "reference": names[0] if names else None,
               "reference_accuracy": ref_seed.mean() if ref_seed.notna().any() else np.nan}
        row["kept"] = row["honest_accuracy"] / row["reference_accuracy"] if row["reference_accuracy"] else np.nan
        row["damage"] = (row["honest_accuracy"] - row["reference_accuracy"]) * 100
        backdoor = glob[(glob["scenario"] == scenario) & (glob["scheme"] == scheme)]["backdoor_success"]
        row["backdoor_success"] = backdoor.mean() if backdoor.notna().any() else np.nan
        g = gains[(gains["scenario"] == scenario) & (gains["scheme"] == scheme)]
        for b in behaviours:
            row[f"gain_{b}"] = g.loc[g["behaviour"] == b, "gain"].mean() if (g["behaviour"] == b).any() else np.nan
        rows.append(row)
    columns = ["scenario", "scheme", "seeds", "misbehaving", "honest_accuracy", "reference", "reference_accuracy", "kept",
               "damage", *[f"gain_{b}" for b in behaviours], "backdoor_success"]
    return order_rows(pd.DataFrame(rows, columns=columns))
