"""Compute balance: who lent compute to whom, what data moved for it, and the simulated time it saved.

Reads the ledger only (columns of sim/core/results.py). Under ``compute_share`` a giver's row
books ``compute_given_seconds`` (simulated device seconds spent on partners' data), a
taker's row ``compute_taken_seconds``, ``data_bytes`` (raw data sent to the partner) and
``trained_by``; every row keeps ``solo_seconds``, what it would have taken without sharing.
A round lasts as long as its slowest row, so the time saved by a run is the sum over rounds
of the slowest ``solo_seconds`` minus the slowest ``simulated_seconds`` (negative when moving
the data costs more than the faster training gives back). Runs written before these
columns existed read as sharing nothing.
"""

from __future__ import annotations

import pandas as pd

from analysis.metrics import GLOBAL, RUN, order_rows
from analysis.page import section, table

BALANCE_COLUMNS = ["scheme", "institution", "role", "partners", "compute_given_seconds", "compute_taken_seconds",
                   "net_compute_seconds", "data_mb"]
SAVED_COLUMNS = ["scheme", "runs", "duration_unshared", "simulated_duration", "time_saved", "time_saved_share"]

GUIDE = {
    "role": ("Role", "giver: trained partners' data on its compute; taker: had a partner train its data.", "text"),
    "partners": ("Partners", "Whom it trained for (giver) or who trained for it (taker).", "text"),
    "compute_given_seconds": ("Compute given (s)", "Simulated device seconds spent training partners' data, per run "
                              "(mean over seeds); priced to this institution.", "float"),
    "compute_taken_seconds": ("Compute taken (s)", "Simulated device seconds a partner spent training this "
                              "institution's data, per run (mean over seeds).", "float"),
    "net_compute_seconds": ("Net (s)", "Compute given minus compute taken: positive = lender, negative = borrower.",
                            "float"),
    "data_mb": ("Data moved (MB)", "Raw training data sent to a partner, per run (mean over seeds).", "mb"),
    "duration_unshared": ("Duration unshared (s)", "Simulated run length had every institution trained its own data: "
                          "each round as long as its slowest institution would have been alone.", "float"),
    "simulated_duration": ("Duration (s)", "Simulated run length as it ran: each round as long as its slowest "
                           "participant.", "float"),
    "time_saved": ("Time saved (s)", "Duration unshared minus duration (negative: moving the data cost more than "
                   "sharing gave back).", "float"),
    "time_saved_share": ("Saved", "Time saved as a share of the unshared duration.", "pct"),
}


def _with_defaults(ledger: pd.DataFrame) -> pd.DataFrame:
    """The ledger with the sharing columns present (older runs: nothing shared, solo = simulated)."""
    lg = ledger[ledger["institution"] != GLOBAL].copy()
    for c in ("compute_given_seconds", "compute_taken_seconds", "data_bytes"):
        lg[c] = lg[c].fillna(0) if c in lg else 0.0
    lg["trained_by"] = lg["trained_by"].fillna(lg["institution"]) if "trained_by" in lg else lg["institution"]
    lg["solo_seconds"] = lg["solo_seconds"].fillna(lg["simulated_seconds"]) if "solo_seconds" in lg \
        else lg["simulated_seconds"]
    return lg


def balance_table(ledger: pd.DataFrame) -> pd.DataFrame:
    """Per scenario x scheme x institution that gave or took compute: seconds given, taken, net, data moved, partners.

    Sums over a run's rounds, then means over the scheme's runs (seeds).
    """
    lg = _with_defaults(ledger)
    cols = ["scenario", *BALANCE_COLUMNS]
    if lg.empty:
        return pd.DataFrame(columns=cols)
    per_run = lg.groupby([*RUN, "institution"], sort=False)[
        ["compute_given_seconds", "compute_taken_seconds", "data_bytes"]].sum().reset_index()
    table_ = per_run.groupby(["scenario", "scheme", "institution"], sort=False)[
        ["compute_given_seconds", "compute_taken_seconds", "data_bytes"]].mean().reset_index()
    table_ = table_[(table_["compute_given_seconds"] > 0) | (table_["compute_taken_seconds"] > 0)]
    shared = lg[lg["trained_by"] != lg["institution"]]
    took = shared.groupby(["scenario", "scheme", "institution"])["trained_by"].agg(_names)
    gave = shared.groupby(["scenario", "scheme", "trained_by"])["institution"].agg(_names)
    gave.index = gave.index.set_names("institution", level=2)
    key = pd.MultiIndex.from_frame(table_[["scenario", "scheme", "institution"]])
    giver = table_["compute_given_seconds"].to_numpy() > 0
    gave_to, took_from = gave.reindex(key).to_numpy(), took.reindex(key).to_numpy()
    table_ = table_.assign(
        role=["giver" if g else "taker" for g in giver],
        partners=[to if g else source for to, source, g in zip(gave_to, took_from, giver)],
        net_compute_seconds=table_["compute_given_seconds"] - table_["compute_taken_seconds"],
        data_mb=table_["data_bytes"] / 1e6,
    )
    return order_rows(table_[cols])


def saved_table(ledger: pd.DataFrame) -> pd.DataFrame:
    """Per scenario x scheme: simulated run length with and without compute sharing, and the difference (mean over
    seeds)."""
    lg = _with_defaults(ledger)
    cols = ["scenario", *SAVED_COLUMNS]
    if lg.empty:
        return pd.DataFrame(columns=cols)
    rounds = lg.groupby([*RUN, "round"], sort=False)[["solo_seconds", "simulated_seconds"]].max()
    per_run = rounds.groupby(level=RUN, sort=False).sum().reset_index()
    out = per_run.groupby(["scenario", "scheme"], sort=False).agg(
        runs=("run_id", "nunique"), duration_unshared=("solo_seconds", "mean"),
        simulated_duration=("simulated_seconds", "mean")).reset_index()
    out["time_saved"] = out["duration_unshared"] - out["simulated_duration"]
    unshared = out["duration_unshared"].where(out["duration_unshared"] > 0)
    out["time_saved_share"] = out["time_saved"] / unshared
    return order_rows(out[cols])


def _names(names: pd.Series) -> str:
    """Distinct institution names, sorted, comma-separated."""
    return ", ".join(sorted(set(names)))


def compute_section(balance: pd.DataFrame, saved: pd.DataFrame, tag: str, suffix: str) -> str:
    """The report's compute-balance section, when some run shared compute ('' otherwise)."""
    if balance.empty:
        return ""
    schemes = set(balance["scheme"])
    body = table(balance.drop(columns="scenario", errors="ignore"), BALANCE_COLUMNS, extra=GUIDE)
    body += table(saved[saved["scheme"].isin(schemes)], SAVED_COLUMNS, extra=GUIDE)
    return section(f"compute{tag}", "Who lent compute to whom" + suffix, body,
                   "Under compute sharing, institutions too slow to keep up hand their training (and, once, their "
                   "raw data) to a partner with spare compute; the giver's device time is booked, and priced, to the "
                   "giver. Simulated seconds, summed over a run's rounds, mean over seeds.")
