"""The report's privacy panel and damage table: shown only when relevant, worded with counted quantifiers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import findings as words
from analysis import trust
from analysis.report import build_report
from sim.core.results import frame
from conftest import small_tables, write_run


def _trust_tables():
    """small_tables plus a DP run (epsilon 2 then 4 in the ledger) and a run where B is a sign-flipper.

    Final accuracies: fedavg A 0.70/0.75; dp A 0.60, B 0.70 (seed 0); cheated (seed 0): A 0.35, B 0.50; isolated A 0.60 B 0.80.
    """
    mt, lg, inst = small_tables()
    extra_m, extra_l, extra_i = [], [], []
    for scheme, acc, eps, bad in (("dp", {"A": 0.60, "B": 0.70, "global": 0.65}, 4.0, None),
                                  ("cheated", {"A": 0.35, "B": 0.50, "global": 0.40}, np.nan, "B")):
        run = {"run_id": f"{scheme}-0", "scheme": scheme, "scenario": "s", "seed": 0}
        for who, v in acc.items():
            for rnd, value in ((0, 0.1), (1, v)):
                for metric, x in (("accuracy", value), ("loss", 1 - value)):
                    extra_m.append({**run, "round": rnd, "institution": who, "discipline": {"A": "x", "B": "y"}.get(who, "global"),
                                    "metric": metric, "value": x})
        for who in ("A", "B"):
            for rnd, e in ((1, eps / 2), (2, eps)):
                extra_l.append({**run, "round": rnd, "institution": who, "participated": True, "bytes_up": 10, "bytes_down": 10,
                                "compute_seconds": 1.0, "simulated_seconds": 1.0, "samples": 100, "epsilon": e})
            extra_i.append({**run, "institution": who, "discipline": {"A": "x", "B": "y"}[who], "share": 0.5,
                            "train_samples": 100, "test_samples": 20, "label_skew": np.nan, "feature_skew": 0.0, "cpus": 1.0,
                            "gpus": 0.0, "behaviour": "sign_flip" if who == bad else "honest"})
    return (pd.concat([mt, frame("metrics", extra_m)], ignore_index=True),
            pd.concat([lg, frame("ledger", extra_l)], ignore_index=True),
            pd.concat([inst, frame("institutions", extra_i)], ignore_index=True))


def test_no_epsilon_and_everyone_honest_means_no_privacy_panel_and_no_damage_table(tmp_path):
    # Prepare: the plain two-scheme tables
    mt, lg, inst = small_tables()
    write_run(tmp_path / "run", mt, lg, inst)
    # Execute
    page = build_report([tmp_path / "run"], tmp_path / "out").read_text()
    # Assert
    assert trust.privacy_table(mt, lg).empty and trust.damage_table(mt, inst).empty
    assert 'id="privacy"' not in page and 'id="damage"' not in page and "What privacy costs" not in page
    assert "What the guarantee covers" not in page


def test_epsilon_and_misbehaviour_bring_the_panel_the_table_and_correct_numbers(tmp_path):
    # Prepare
    mt, lg, inst = _trust_tables()
    write_run(tmp_path / "run", mt, lg, inst)
    # Execute
    privacy, damage = trust.privacy_table(mt, lg), trust.damage_table(mt, inst)
    page = build_report([tmp_path / "run"], tmp_path / "out").read_text()
    # Assert: epsilon is the run's last (largest) spend; schemes without noise have none
    dp = privacy.set_index("scheme").loc["dp"]
    assert dp["epsilon"] == 4.0 and np.isclose(dp["mean_accuracy"], 0.65)
    assert privacy.set_index("scheme").loc["fedavg", "epsilon"] != privacy.set_index("scheme").loc["fedavg", "epsilon"]
    # Damage: only the run with a cheat has a row; A (honest) reaches 0.35 against 0.70 under the all-honest fedavg, seed 0
    row = damage.set_index("scheme").loc["cheated"]
    assert list(damage["scheme"]) == ["cheated"] and row["reference"] == "fedavg"
    assert np.isclose(row["kept"], 0.5) and np.isclose(row["damage"], -35.0)
    assert np.isclose(row["gain_sign_flip"], (0.50 - 0.80) * 100)  # B's own gain against its isolated 0.80
    assert 'id="privacy"' in page and 'id="damage"' in page and "Gain of sign flip" in page
    assert "What the guarantee covers." in page and "Outside the guarantee, and sent as they are" in page


def test_findings_count_schemes_and_never_say_all_for_some():
    # Prepare: three schemes under attack, one keeps >= 95% of the reference
    damage = pd.DataFrame({"scheme": ["fedavg", "median", "krum"], "reference": "fedavg_honest",
                           "kept": [0.40, 0.97, 0.90], "damage": [-50.0, -2.0, -8.0], "gain_free_rider": [5.0, -1.0, np.nan]})
    # Execute
    said = dict(words.damage_findings(damage))
    # Assert
    assert "1 of 3 schemes keeps at least 95%" in said["Damage by misbehaving partners"]
    assert "(median)" in said["Damage by misbehaving partners"] and "fedavg keeps the least, 40.0%" in said["Damage by misbehaving partners"]
    assert "1 of 2 schemes" in said["What misbehaving pays"]  # krum has no free-rider value: not counted
    assert words.count_phrase(3, 3, "scheme", "keep") == "all 3 schemes keep"
    assert words.count_phrase(0, 3, "scheme", "keep") == "none of the 3 schemes keeps"
    privacy = pd.DataFrame({"scheme": ["isolated", "dp", "dp", "fedavg"], "epsilon": [np.nan, 1.0, 8.0, np.nan],
                            "mean_accuracy": [0.7, 0.5, 0.8, 0.9]})
    text = dict(words.privacy_findings(privacy))["What privacy costs"]
    assert "dp at ε = 8 (80.0% mean accuracy)" in text and "ε = 1, dp reaches 50.0%" in text
    assert "1 of 2 private runs beats training alone" in text


def test_behaviours_drawn_per_seed_read_differs_by_seed_but_an_all_honest_reference_does_not_count(tmp_path):
    # Prepare: B misbehaves in the cheated run only; the fedavg runs (all honest) are the reference
    mt, lg, inst = _trust_tables()
    redrawn = inst[inst["scheme"] == "cheated"].assign(run_id="cheated-1", seed=1, behaviour=lambda d: d["behaviour"][::-1].to_numpy())
    write_run(tmp_path / "run", mt, lg, inst)
    write_run(tmp_path / "redrawn", mt[mt["run_id"] == "cheated-0"].assign(run_id="cheated-1", seed=1), lg.iloc[:0], redrawn)
    # Execute
    fixed = build_report([tmp_path / "run"], tmp_path / "a").read_text()
    varied = build_report([tmp_path / "run", tmp_path / "redrawn"], tmp_path / "b").read_text()
    # Assert: one seed: B is named; two seeds with A and B swapped: both read 'differs by seed', nobody is named
    assert "Not every partner behaves: B is sign_flip." in fixed and words.VARIES not in fixed
    assert "2 of 2 do so in some seed" in varied and "B is sign_flip" not in varied


def test_the_run_with_nobody_cheating_is_labelled_a_reference_and_never_headlined_as_best(tmp_path):
    # Prepare: the trust tables, B free-riding under fedavg, plus fedavg_honest, every institution honest and the most
    # accurate of all (95%): as the trust experiment runs it
    mt, lg, inst = _trust_tables()
    inst.loc[(inst["scheme"] == "fedavg") & (inst["institution"] == "B"), "behaviour"] = "free_rider"
    honest = [t[t["scheme"] == "fedavg"].assign(scheme="fedavg_honest", run_id=lambda d: d["run_id"] + "-honest")
              for t in (mt, lg, inst)]
    honest[0].loc[honest[0]["metric"] == "accuracy", "value"] = 0.95
    honest[2]["behaviour"] = "honest"
    run = write_run(tmp_path / "r", *(pd.concat([a, b], ignore_index=True) for a, b in zip((mt, lg, inst), honest)))
    # Execute
    page = build_report([run], tmp_path / "out").read_text()
    # Assert: the reference is named as one in the summary, and the findings rank the schemes one could choose
    findings = page.split('<section id="findings" class="findings">')[1].split("</section>")[0]
    summary = page.split('<section id="summary">')[1].split("</section>")[0]
    assert "fedavg_honest (reference)" in summary and "not a scheme to choose" in summary
    assert "fedavg_honest gains the most" not in findings and "fedavg_honest has the highest" not in findings
    assert "the best, fedavg," in findings or "fedavg has the highest mean gain" in findings
    assert list(trust.reference_schemes(pd.concat([inst, honest[2]]))["scheme"]) == ["fedavg_honest"]
