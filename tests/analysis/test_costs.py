"""The cost model: pricing arithmetic on a hand-built ledger, per-institution prices, time and cost to target, the report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.cost_report import cost_findings
from analysis.costs import MIN_CPUS, Prices, cost_tables, priced_ledger, prices_from_config
from analysis.report import build_report
from conftest import write_run
from sim.core.results import frame
from sim.core.types import ConfigError

# Prices and usages are small binary-friendly numbers: sums agree with the hand computation to far below 1e-9.
COSTS = {"currency": "EUR", "cpu_hour": 1.0, "gpu_hour": 10.0, "gb": 2.0, "cpu_watts": 100.0, "gpu_watts": 1000.0,
         "kwh": 0.5, "co2_per_kwh": 0.2, "institutions": {"B": {"gpu_hour": 4.0}}}
SIM_TIME = {"fedavg": {1: 3700.0, 2: 7400.0}, "pooled": {1: 8000.0, 2: 15200.0}}
ACCURACY = {"fedavg": {0: 0.1, 1: 0.6, 2: 0.8}, "pooled": {0: 0.1, 1: 0.86, 2: 0.9}}  # mean of A and B per round


def hand_tables():
    """A (2 CPUs) and B (1 CPU + half a GPU); fedavg trains locally and exchanges bytes, pooled uploads raw data once
    and trains centrally (the global row) for 7200 simulated seconds a round.

    Per round, by hand (prices in COSTS; B's GPU-hour at 4):
      fedavg A: 2 CPU-h -> 2, 2 GB -> 4, 0.2 kWh -> 0.1: 6.1;  B: 0.5 CPU-h + 0.25 GPU-h -> 0.5 + 1, 1 GB -> 2,
                0.3 kWh -> 0.15: 3.65.  Run: 2 x 9.75 = 19.5.
      pooled central: A 4 CPU-h -> 4, 0.4 kWh -> 0.2: 4.2;  B 2 CPU-h + 1 GPU-h -> 2 + 4, 1.2 kWh -> 0.6: 6.6;
                round 1 also A 2 GB -> 4 and B 1 GB -> 2.  Run: 2 x 10.8 + 6 = 27.6.
    """
    metrics, ledger, institutions = [], [], []
    for scheme in ("fedavg", "pooled"):
        run = {"run_id": f"{scheme}-0", "scheme": scheme, "scenario": "s", "seed": 0}
        for rnd, acc in ACCURACY[scheme].items():
            for who, shift in (("A", -0.05), ("B", 0.05)):
                metrics.append({**run, "round": rnd, "institution": who, "discipline": "x", "metric": "accuracy",
                                "value": acc + shift})
        for rnd in (1, 2):
            t = SIM_TIME[scheme][rnd]
            if scheme == "fedavg":
                rows = [("A", 3600.0, 1e9, 1e9), ("B", 1800.0, 5e8, 5e8), ("global", 0.0, 0, 0)]
            else:
                rows = [("A", 0.0, 2e9 if rnd == 1 else 0, 0), ("B", 0.0, 1e9 if rnd == 1 else 0, 0), ("global", 7200.0, 0, 0)]
            for who, sim_compute, up, down in rows:
                ledger.append({**run, "round": rnd, "institution": who, "participated": True, "bytes_up": int(up),
                               "bytes_down": int(down), "compute_seconds": 0.1, "simulated_seconds": sim_compute,
                               "sim_compute_seconds": sim_compute, "sim_time": t, "samples": 10, "epsilon": np.nan,
                               "status": "ok"})
        for who, cpus, gpus in (("A", 2.0, 0.0), ("B", 1.0, 0.5)):
            institutions.append({**run, "institution": who, "discipline": "x", "share": 0.5, "train_samples": 10,
                                 "test_samples": 5, "cpus": cpus, "gpus": gpus, "behaviour": "honest", "speed": 1.0})
    return frame("metrics", metrics), frame("ledger", ledger), frame("institutions", institutions)


@pytest.fixture
def priced_run(tmp_path):
    return write_run(tmp_path / "run", *hand_tables(), config={"seed": 0, "rounds": 2, "costs": COSTS})


def tables(run_dir, target=None):
    from analysis.runs import load_results

    r = load_results([run_dir])
    return cost_tables(r.metrics, r.ledger, r.institutions, r.configs, target)


def test_money_and_energy_per_scheme_match_the_hand_computation(priced_run):
    out, notes = tables(priced_run)
    money = out["money"].set_index("scheme")
    assert notes == []
    assert money.loc["fedavg", "money"] == pytest.approx(19.5, abs=1e-9)
    assert money.loc["pooled", "money"] == pytest.approx(27.6, abs=1e-9)
    assert money.loc["fedavg", "transfer_money"] == pytest.approx(12.0, abs=1e-9)
    assert money.loc["pooled", "gpu_hours"] == pytest.approx(2.0, abs=1e-9)  # B's half GPU, 2 x 7200 s
    assert money.loc["pooled", "kwh"] == pytest.approx(3.2, abs=1e-9)
    assert money.loc["pooled", "co2_kg"] == pytest.approx(0.64, abs=1e-9)
    assert money.loc["fedavg", "duration"] == 7400.0 and set(money["currency"]) == {"EUR"}


def test_central_training_is_paid_by_each_institution_for_its_own_devices(priced_run):
    out, _ = tables(priced_run)
    who = out["money_per_institution"].set_index(["scheme", "institution"])
    assert who.loc[("pooled", "A"), "central_money"] == pytest.approx(8.4, abs=1e-9)
    assert who.loc[("pooled", "B"), "central_money"] == pytest.approx(13.2, abs=1e-9)  # B's GPU at its own 4/h
    assert who.loc[("pooled", "B"), "money"] == pytest.approx(15.2, abs=1e-9)
    assert who.loc[("fedavg", "A"), "share_paid"] == pytest.approx(12.2 / 19.5)


def test_per_institution_override_changes_only_that_institution():
    prices = Prices("USD", {"cpu_hour": 1.0, "gpu_hour": 10.0, "gb": 0.0, "cpu_watts": None, "gpu_watts": None,
                            "kwh": 0.0, "co2_per_kwh": None}, {"B": {"gpu_hour": 4.0}})
    metrics, ledger, institutions = hand_tables()
    rows = priced_ledger(ledger, institutions, {"fedavg-0": prices, "pooled-0": prices})
    per = rows[rows["run_id"] == "pooled-0"].groupby("institution")["compute_money"].sum()
    assert per["A"] == pytest.approx(8.0) and per["B"] == pytest.approx(2 * (2 + 4.0))
    assert rows["kwh"].isna().all() and rows["co2_kg"].isna().all()  # no watts: no energy figures, no energy money


def test_an_institution_with_under_a_tenth_of_a_core_pays_for_the_clocks_tenth_of_a_core():
    from sim.core.clock import compute_seconds
    from sim.core.types import InstitutionSpec

    spec = lambda cpus: InstitutionSpec(index=0, name="n", discipline="d", share=1.0, cpus=cpus, gpus=0.0)  # noqa: E731
    assert compute_seconds(spec(0.0), 100, 1000) == compute_seconds(spec(0.05), 100, 1000) == \
        compute_seconds(spec(MIN_CPUS), 100, 1000) > compute_seconds(spec(0.2), 100, 1000)
    for declared in (0.0, 0.05):
        metrics, ledger, institutions = hand_tables()
        institutions.loc[institutions["institution"] == "A", "cpus"] = declared
        rows = priced_ledger(ledger, institutions, {"fedavg-0": prices_from_config({"costs": COSTS})})
        assert rows[rows["institution"] == "A"]["cpu_hours"].sum() == pytest.approx(2 * 3600 * MIN_CPUS / 3600)


def test_time_and_cost_to_target_default_and_given(priced_run):
    out, _ = tables(priced_run)
    goal = out["targets"].iloc[0]
    assert goal["target"] == pytest.approx(0.95 * 0.9) and goal["best_scheme"] == "pooled" and goal["best_accuracy"] == pytest.approx(0.9)
    money = out["money"].set_index("scheme")
    assert money.loc["fedavg", "reached"] == 0 and np.isnan(money.loc["fedavg", "time_to_target"])
    assert money.loc["pooled", "time_to_target"] == 8000.0  # round 1 (0.86 >= 0.855)
    assert money.loc["pooled", "cost_to_target"] == pytest.approx(10.8 + 6.0)
    given, _ = tables(priced_run, target=0.7)
    fedavg = given["time_to_target"].set_index("scheme").loc["fedavg"]
    assert fedavg["round"] == 2 and fedavg["time_to_target"] == 7400.0 and fedavg["cost_to_target"] == pytest.approx(19.5)


def test_bad_prices_in_a_run_config_are_one_line():
    with pytest.raises(ConfigError, match=r"^costs\.gb: must be >= 0"):
        prices_from_config({"costs": {**COSTS, "gb": -1.0}})
    with pytest.raises(ConfigError, match=r"^costs\.institutions\.B\.gpu_hr: unknown key"):
        prices_from_config({"costs": {**COSTS, "institutions": {"B": {"gpu_hr": 1.0}}}})


def test_report_has_the_money_section_and_the_cost_pareto(priced_run, tmp_path):
    page = build_report([priced_run], tmp_path / "out").read_text()
    costs = re.search(r'<section id="costs">(.*?)</section>', page, re.S).group(1)
    assert "Money, energy and time to target" in costs and "Who pays what" in costs
    assert "Target: 85.5% mean accuracy" in costs and "of the best mean accuracy in the summary (pooled, 90.0%, at the selected round" in costs
    assert "Money (EUR)" in costs and "27.60" in costs and "19.50" in costs
    assert costs.count("data:image/png;base64,") == 2  # MB and money Pareto fronts
    findings = re.search(r'<section id="findings" class="findings">(.*?)</section>', page, re.S).group(1)
    assert ("pooled reaches the target of 85.5% mean accuracy in every seed; of those, pooled gets there, 16.80 EUR"
            in findings)
    assert "fedavg never reaches it" in findings
    for name in ("money", "money_per_institution", "time_to_target", "targets"):
        assert (tmp_path / "out" / "tables" / f"{name}.csv").is_file()


def test_old_runs_without_the_columns_or_the_config_still_report(tmp_path):
    metrics, ledger, institutions = hand_tables()
    old = write_run(tmp_path / "old", metrics, ledger.drop(columns=["sim_compute_seconds", "sim_time"]),
                    institutions.drop(columns=["speed"]), config={"seed": 0, "rounds": 2, "costs": COSTS})
    page = build_report([old], tmp_path / "out").read_text()
    assert "carry no cost model" in page and "Money, energy" not in page
    assert page.count("carry no cost model") == 1 and "Check before reading" not in page
    unpriced = write_run(tmp_path / "unpriced", *hand_tables())  # new columns, but no costs group in config.yaml
    page = build_report([unpriced], tmp_path / "out2").read_text()
    assert "carry no cost model" in page and "Money (" not in page


def test_a_mix_of_priced_and_old_runs_prices_the_new_and_warns_once(tmp_path, priced_run):
    metrics, ledger, institutions = hand_tables()
    later = [t.assign(run_id=t["run_id"] + "-old", seed=1) for t in (metrics, ledger, institutions)]
    old = write_run(tmp_path / "old", *later)
    page = build_report([priced_run, old], tmp_path / "out").read_text()
    assert "Money, energy and time to target" in page
    assert page.count("2 of 4 runs carry no cost model") == 1


def test_cli_target_option(priced_run, tmp_path, capsys):
    assert main(["report", str(priced_run), "--out", str(tmp_path / "o"), "--target", "0.7"]) == 0
    assert "Target: 70.0% mean accuracy" in (tmp_path / "o" / "report.html").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(priced_run), "--target", "1.5"])
    assert exit_.value.code == 2 and "expected an accuracy in (0, 1]" in capsys.readouterr().err


def test_a_compare_is_repriced_by_its_own_config_over_its_runs_configs(tmp_path):
    metrics, ledger, institutions = hand_tables()
    compare = write_run(tmp_path / "cmp", metrics, ledger, institutions, config={"seed": 0, "costs": COSTS})
    cheap = {**COSTS, "gb": 0.0, "institutions": {}}
    for scheme in ("fedavg", "pooled"):  # each run's own directory, as sim.compare writes it
        pick = [t[t["scheme"] == scheme] for t in (metrics, ledger, institutions)]
        write_run(compare / "runs" / scheme, *pick, config={"seed": 0, "costs": cheap})
    out, _ = tables(compare)
    assert out["money"].set_index("scheme").loc["fedavg", "money"] == pytest.approx(19.5)  # the compare's prices
    (compare / "config.yaml").write_text("seed: 0\n")  # no costs of its own: each run's config prices it
    out, _ = tables(compare)
    assert out["money"].set_index("scheme").loc["fedavg", "transfer_money"] == 0.0


def test_time_to_target_reads_the_summarys_selected_accuracy_not_a_round_it_fell_back_from(tmp_path):
    # Prepare: fedavg touches 88% in round 1 and ends (its selected, last round) at 80%; pooled peaks at 95% in
    # round 1 and ends at 90%, the summary's figure
    metrics, ledger, institutions = hand_tables()
    at = lambda scheme, rnd: (metrics["scheme"] == scheme) & (metrics["round"] == rnd)  # noqa: E731
    metrics.loc[at("fedavg", 1), "value"] = [0.83, 0.93]
    metrics.loc[at("pooled", 1), "value"] = [0.90, 1.00]
    run = write_run(tmp_path / "run", metrics, ledger, institutions, config={"seed": 0, "rounds": 2, "costs": COSTS})
    # Execute
    out, _ = tables(run)
    # Assert: the target is 95% of the summary's best mean accuracy (90%), and fedavg, whose selected 80% is below
    # it, does not count as reaching it
    goal = out["targets"].iloc[0]
    assert goal["best_accuracy"] == pytest.approx(0.9) and goal["target"] == pytest.approx(0.95 * 0.9)
    money = out["money"].set_index("scheme")
    assert money.loc["fedavg", "reached"] == 0 and np.isnan(money.loc["fedavg", "time_to_target"])
    assert money.loc["pooled", "reached"] == 1 and money.loc["pooled", "time_to_target"] == 8000.0


def test_tiny_amounts_read_in_a_named_unit_with_the_scale_they_assume(tmp_path):
    # Prepare: prices a millionth of the hand-made ones, so runs cost 27.6 and 19.5 millionths of a EUR
    tiny = {**COSTS, **{k: COSTS[k] * 1e-6 for k in ("cpu_hour", "gpu_hour", "gb", "kwh")},
            "institutions": {"B": {"gpu_hour": 4e-6}}}
    run = write_run(tmp_path / "run", *hand_tables(), config={"seed": 0, "rounds": 2, "costs": tiny})
    # Execute
    page = build_report([run], tmp_path / "out").read_text()
    # Assert: no e-notation anywhere, the unit spelt out, the scale said
    assert not re.search(r"\d\.?\d*e-\d\d", page)
    costs = re.search(r'<section id="costs">(.*?)</section>', page, re.S).group(1)
    assert "Money (µEUR)" in costs and "27.60" in costs and "µEUR = millionths of a EUR" in costs
    assert "costs.scale = 1" in costs
    findings = re.search(r'<section id="findings" class="findings">(.*?)</section>', page, re.S).group(1)
    assert "16.80 µEUR (millionths of a EUR)" in findings


def test_costs_scale_prices_a_declared_real_world_scale(tmp_path):
    # Prepare: the hand-made prices at 1,000 times the simulated work
    run = write_run(tmp_path / "run", *hand_tables(), config={"seed": 0, "rounds": 2, "costs": {**COSTS, "scale": 1000.0}})
    # Execute
    out, _ = tables(run)
    page = build_report([run], tmp_path / "out").read_text()
    # Assert: money and usage are 1,000 times the unscaled ones; the report says the scale it priced at
    money = out["money"].set_index("scheme")
    assert money.loc["pooled", "money"] == pytest.approx(27.6 * 1000) and money.loc["fedavg", "money"] == pytest.approx(19.5e3)
    assert money.loc["pooled", "scale"] == 1000.0
    assert "1,000 times the simulated ones (costs.scale = 1,000)" in page
    with pytest.raises(ConfigError, match=r"^costs\.scale: must be > 0"):
        prices_from_config({"costs": {**COSTS, "scale": 0.0}})


def test_the_compute_column_does_not_move_with_machine_load(tmp_path):
    # Prepare: the same runs twice, the second measured on a machine three times as busy (wall time x 3)
    metrics, ledger, institutions = hand_tables()
    calm = write_run(tmp_path / "calm", metrics, ledger, institutions, config={"seed": 0, "rounds": 2, "costs": COSTS})
    busy = write_run(tmp_path / "busy", metrics, ledger.assign(compute_seconds=ledger["compute_seconds"] * 3),
                     institutions, config={"seed": 0, "rounds": 2, "costs": COSTS})
    # Execute
    pages = [build_report([run], tmp_path / f"out-{run.name}").read_text() for run in (calm, busy)]
    # Assert: the costs sections read the same; compute is the simulated device time, labelled so
    sections = [re.search(r'<section id="costs">(.*?)</section>', p, re.S).group(1) for p in pages]
    assert sections[0] == sections[1]
    assert "Compute (simulated s)" in sections[0] and "Compute (s)" not in sections[0]


def test_a_scheme_that_reaches_the_target_in_some_seeds_is_counted_by_seed_beside_its_mean():
    # Prepare: fedavg reaches the target in 1 of 3 seeds, pooled in all 3 (money table as cost_tables makes it)
    money = pd.DataFrame({"scenario": "s", "scheme": ["fedavg", "pooled"], "runs": 3, "reached": [1, 3],
                          "mean_accuracy": [0.767, 0.909], "money": [4e-4, 1.3e-4], "cost_to_target": [2e-4, 1e-4],
                          "time_to_target": [1.7, 0.13], "currency": "USD", "scale": 1.0})
    goal = pd.DataFrame({"scenario": ["s"], "target": [0.864]})
    per_inst = pd.DataFrame(columns=["scheme", "institution", "money", "share_paid"])
    # Execute
    text = dict(cost_findings(money, per_inst, goal))["Time and money to target"]
    # Assert: never '2 of 2 schemes reach the target' for a scheme whose mean is 10 points below it
    assert text.startswith("pooled reaches the target of 86.4% mean accuracy in every seed; fedavg in 1 of 3 seeds "
                           "(mean accuracy 76.7%) only")
    assert "2 of 2 schemes" not in text
