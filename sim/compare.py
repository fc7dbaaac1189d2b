"""``python -m sim.compare``: several schemes on one scenario, over one or more seeds, and the table that compares them."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from sim.cli import compose, fail, group_options, launch, swept_values, without_flags
from sim.checks import load_spec
from sim.core import rundir
from sim.core.caveats import caveats
from sim.core.config import RunSpec
from sim.core.results import write_csv, write_table, write_text
from sim.core.types import ConfigError, listing
from sim.sweep import tuning

log = logging.getLogger("collabsim")
BASELINE = "isolated"
TUNED = "tuned.csv"  # tune=N: the settings each scheme was run with, and the validation score that chose them


def scheme_configs(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """One composed run config per scheme in ``cfg.schemes`` (the baseline added if missing), then one per variant.

    A variant (``variants.LABEL: [overrides]``) is a run beside the schemes with overrides of its own, e.g. the
    same scheme with full fine-tuning instead of LoRA; its results carry LABEL in the ``scheme`` column.

    ``parts`` (``LABEL: {schemes, overrides, variants}``), when given, replace ``schemes`` and ``variants``: each part
    is a comparison of its own under its overrides, with its own baseline, and its runs carry LABEL in the
    ``scenario`` column, so gains are measured within a part. Their keys are ``LABEL/scheme``.
    """
    check_resume(cfg.get("resume"))
    keep = run_overrides(overrides)
    parts = cfg.get("parts") or {}
    if not parts:
        return _part(cfg.schemes, cfg.get("variants"), keep, "")
    if not isinstance(parts, (dict, DictConfig)):
        raise ConfigError("parts", f"expected LABEL: {{schemes: [...], overrides: [...]}} entries, got {parts!r}")
    configs = {}
    for label, part in parts.items():
        extra = (part or {}).get("overrides") or []
        if not isinstance(extra, (list, ListConfig)) or not all(isinstance(o, str) and "=" in o for o in extra):
            raise ConfigError(f"parts.{label}.overrides", f"expected a list of overrides like data.task=kind, got {extra!r}")
        unknown = set(part or {}) - {"schemes", "overrides", "variants"}
        if unknown:
            raise ConfigError(f"parts.{label}", f"unknown key(s) {listing(sorted(unknown))}; a part takes schemes, "
                              "overrides and variants")
        runs = _part((part or {}).get("schemes"), (part or {}).get("variants"), [*keep, *extra, f"scenario.name={label}"],
                     f"parts.{label}.")
        configs |= {f"{label}/{name}": sub for name, sub in runs.items()}
    return configs


def run_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides that every run gets: all but the compare's own keys."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("schemes=", "report=", "scheme=", "seeds=", "tune=",
                                                                   "variants", "resume=", "parts"))]


def _part(schemes: Any, variants: Any, keep: list[str], key: str) -> dict[str, DictConfig]:
    """The run configs of one comparison: its schemes (the baseline first, added if missing), then its variants."""
    names = [schemes] if isinstance(schemes, str) else list(schemes or [])
    if not [n for n in names if n != BASELINE] and not variants:
        raise ConfigError(key + "schemes", f"{'is empty' if not names else f'holds only {BASELINE}'}, so the compare would "
                          f"run the {BASELINE} baseline alone; list the schemes to compare with it, e.g. "
                          "schemes=[fedavg,fedprox]")
    unknown = [n for n in names if n not in group_options("scheme")]
    if unknown:
        raise ConfigError(key + "schemes", f"unknown scheme(s) {listing(map(repr, unknown))}; choose from "
                          f"{', '.join(group_options('scheme'))}")
    if BASELINE not in names:
        log.warning("adding the %s baseline: every gain is measured against it", BASELINE)
        names.insert(0, BASELINE)
    configs = {n: compose("config", keep + [f"scheme={n}"]) for n in dict.fromkeys(names)}
    for label, extra in (variants or {}).items():
        if label in configs or label in group_options("scheme"):
            raise ConfigError(f"{key}variants.{label}", "a variant needs a label of its own, not a scheme's name")
        if not isinstance(extra, (list, ListConfig)) or not all(isinstance(o, str) and "=" in o for o in extra):
            raise ConfigError(f"{key}variants.{label}", f"expected a list of overrides like scheme=fedavg, got {extra!r}")
        configs[label] = compose("config", keep + list(extra))
    return configs


def tune_schemes(cfg: DictConfig, overrides: list[str], configs: dict[str, DictConfig], spaces: dict,
                 out_dir: Path) -> pd.DataFrame:
    """tune=N: every scheme's N trials under Ray Tune on the compare's first seed; write tuning.csv (every trial) and
    tuned.csv (each scheme's choice); return the choices."""
    n = tuning.tune_count(cfg)
    plan = {name: tuning.candidates(name, spaces[name], sub, n, int(cfg.seed)) for name, sub in configs.items()}
    log.info("tuning: %d trials for each of %d schemes on seed %d, chosen on validation accuracy: %s", n, len(plan),
             int(cfg.seed), tuning.listed(spaces))
    trials = tuning.tune_trials(plan, run_overrides(overrides), OmegaConf.to_container(cfg.cluster, resolve=True),
                                out_dir)
    chosen = tuning.choose(trials)
    write_csv(tuning.trials_table(trials), out_dir / "tuning.csv")
    write_csv(chosen.drop(columns="values").assign(seed=int(cfg.seed)), out_dir / TUNED)
    return chosen


def tuned_configs(overrides: list[str], choices: dict[str, dict]) -> dict[str, DictConfig]:
    """Each scheme's run config with its chosen settings."""
    return {name: compose("config", tuning.trial_overrides(run_overrides(overrides), name, values))
            for name, values in choices.items()}


def tuning_lines(chosen: pd.DataFrame | None, seed: int) -> list[str]:
    """What the terminal says about tuning: plainly whether the schemes were tuned, and what was chosen."""
    if chosen is None or chosen.empty:
        return ["tuning: none; every scheme ran at its config settings (tune=N gives each scheme the same budget of N "
                "Ray Tune trials of its own settings, chosen on validation data)"]
    lines = [f"tuning: each scheme had the same {int(chosen['trials'].max())} Ray Tune trials of its own settings on seed "
             f"{seed}, chosen on validation accuracy only; test data never chose them (tuning.csv, tuned.csv)"]
    for r in chosen.itertuples():
        kept = " (its config settings)" if r.chosen_trial == 0 else ""
        lines.append(f"  {r.scheme}: {r.settings}{kept}  validation {r.val_score:.3f} against {r.config_val_score:.3f} "
                     "at its config settings")
    return lines


def check_resume(resume: object) -> None:
    """A compare continues with ``resume=true`` in its own directory; a run's directory is refused: every scheme would
    take that one run's results (one run labelled as every scheme)."""
    if isinstance(resume, str):
        raise ConfigError("resume", f"{resume} is one run's directory, and a compare runs several schemes: resuming it "
                          "would label that one run as each of them; continue a compare with the same command plus "
                          "resume=true in its hydra.run.dir, or one run of it with python -m sim resume=RUN_DIR")
    if resume is not None and not isinstance(resume, bool):
        raise ConfigError("resume", f"expected true or false, got {resume!r}")


def check_same(out_dir: Path, plan: dict) -> None:
    """Refuse ``resume=true`` unless ``out_dir`` holds a compare started with this very plan (schemes, seeds, configs)."""
    saved = rundir.read_marker(out_dir, rundir.COMPARE_MARKER)
    if not saved:
        raise ConfigError("resume", f"{out_dir} holds no compare to continue; give its hydra.run.dir (the same command "
                          "plus resume=true)")
    plan = json.loads(json.dumps(plan, default=str))  # as the marker holds it
    if plan != saved.get("plan"):
        keys = rundir.changed_keys(saved.get("plan"), plan)
        raise ConfigError("resume", f"{out_dir} holds a compare of other settings (changed: {', '.join(keys[:5])}); "
                          "continue it with the command that started it plus resume=true")


def runs_done(out_dir: Path) -> tuple[int, int]:
    """(complete runs, runs planned) of the compare in ``out_dir``."""
    from sim.core.checkpoint import read_status

    planned = rundir.read_marker(out_dir, rundir.COMPARE_MARKER).get("plan") or {}
    total = len(planned.get("seeds", [])) * len(planned.get("runs", {}))
    runs = (out_dir / "runs").glob("*") if (out_dir / "runs").is_dir() else ()
    return sum(read_status(run).get("state") == "complete" for run in runs), total


def seed_list(cfg: DictConfig) -> list[int]:
    """The replications a compare runs: ``seeds`` consecutive seeds from ``seed``."""
    n = cfg.get("seeds", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("seeds", f"expected a whole number of seeds >= 1, got {n!r}")
    return [int(cfg.seed) + k for k in range(n)]


def compare(cfg: DictConfig, overrides: list[str], out_dir: Path,
            on_round: Callable[[str, int, int, dict[str, float]], None] | None = None) -> pd.DataFrame:
    """Run every scheme on every seed, write the combined tables and summary.csv into ``out_dir``, return the summary.

    One pool of warm actors serves every run: processes start once per command, not per scheme or seed.
    ``on_round(label, seed, round, summary)`` is called after each scored round of each run (a progress bar).
    """
    from agents.runtime.warm import ActorPool
    from analysis.metrics import summary
    from sim.engine import run

    configs, seeds = scheme_configs(cfg, overrides), seed_list(cfg)
    spaces = tuning.check_tuning(cfg, configs)  # tune=N: each scheme's search space, checked before anything starts
    overwrite, resume = bool(cfg.get("overwrite", False)), bool(cfg.get("resume"))
    if resume and spaces and (out_dir / TUNED).is_file():  # a tuned compare continues with the settings it chose
        configs = tuned_configs(overrides, tuning.read_choices(out_dir / TUNED))
    plan = {"seeds": seeds, "runs": {name: OmegaConf.to_container(sub, resolve=True) for name, sub in configs.items()}}
    if resume:  # the same compare, continued: its plan as it was written when it started
        check_same(out_dir, plan)
    else:
        rundir.check_fresh(out_dir, overwrite)  # before Ray starts and before anything in out_dir is touched
    rundir.acquire(out_dir)
    if overwrite and not resume:
        rundir.clear(out_dir)
    results, pool, chosen = [], ActorPool(), None
    try:
        if spaces and not resume:  # tune=N: the same budget of trials for every scheme, chosen on validation data
            chosen = tune_schemes(cfg, overrides, configs, spaces, out_dir)
            configs = tuned_configs(overrides, dict(zip(chosen["scheme"], chosen["values"])))
            plan["runs"] = {name: OmegaConf.to_container(sub, resolve=True) for name, sub in configs.items()}
        elif spaces:
            chosen = pd.read_csv(out_dir / TUNED)
        if not resume:
            rundir.write_marker(out_dir, rundir.COMPARE_MARKER, plan=plan)
        for seed in seeds:
            for name, sub in configs.items():
                sub = sub.copy()
                sub.seed = seed
                stem = name.replace("/", "-")  # a part's run: LABEL-scheme
                where = out_dir / "runs" / (stem if len(seeds) == 1 else f"{stem}-s{seed}")
                log.info("run %d/%d: %s, seed %d", len(results) + 1, len(configs) * len(seeds), name, seed)
                if resume and (where / "status.json").is_file():
                    sub.resume = str(where)  # done: its tables; stopped: from its last checkpoint
                hook = {} if on_round is None else {"on_round": functools.partial(on_round, name, seed)}
                result = run(sub, where, pool=pool, **hook)
                for table in (result.metrics, result.ledger, result.institutions):
                    table["scheme"] = name.rpartition("/")[2]  # the label asked for: a variant's, or the scheme's
                results.append(result)
    finally:
        pool.close()
        rundir.release(out_dir)
    metrics = pd.concat([r.metrics for r in results], ignore_index=True)
    ledger = pd.concat([r.ledger for r in results], ignore_index=True)
    institutions = pd.concat([r.institutions for r in results], ignore_index=True)
    write_text(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "config.yaml")
    write_table(metrics, out_dir / "metrics.parquet")
    write_table(ledger, out_dir / "ledger.parquet")
    write_table(institutions, out_dir / "institutions.parquet")
    table = summary(metrics, ledger)
    if chosen is not None:  # the settings each scheme ran with, beside its numbers
        table["tuned_settings"] = table["scheme"].map(dict(zip(chosen["scheme"], chosen["settings"])))
    write_csv(table, out_dir / "summary.csv")
    table.attrs["tuning"] = tuning_lines(chosen, seeds[0])
    table.attrs["caveats"] = caveats([r.config for r in results], institutions, metrics)
    return table


@hydra.main(config_path="../conf", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Compare the configured schemes and print the table."""
    out = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    try:
        table = compare(cfg, overrides, out)
    except ConfigError as e:
        fail(str(e))
    except KeyboardInterrupt:
        done, total = runs_done(out)
        again = " ".join(o for o in overrides if not o.startswith(("resume=", "hydra.run.dir=")))
        print(f"interrupted: {done} of {total} runs complete in {out} (the one under way keeps its last checkpoint); "
              f"continue with: python -m sim.compare {again + ' ' if again else ''}resume=true hydra.run.dir={out}",
              file=sys.stderr)
        raise SystemExit(130) from None
    from analysis.terminal import summary_text

    text = summary_text(table.drop(columns="tuned_settings", errors="ignore"), BASELINE)
    print(text)  # intervals as text, or why there is none: never NaN
    for line in table.attrs.get("tuning", []):  # plainly: were the schemes tuned, and to what
        print(line)
    for caveat in table.attrs.get("caveats", []):  # the warnings that change what the numbers mean, under the numbers
        print(f"note: {caveat}")
    print(f"summary: {out / 'summary.csv'}")
    report = write_report(cfg, out)
    if report is not None:
        print(f"report: {report}")
    track(cfg, out, table, text, report)


def track(cfg: DictConfig, out: Path, table: pd.DataFrame, text: str, report: Path | None) -> None:
    """Log the compare (each run, the summary, the report) to the tracking backend (``tracking=``)."""
    from sim.tracking import parse, track_compare

    tracking = parse(cfg.get("tracking"))
    try:
        folder = track_compare(tracking, out, cfg, table, text, report)
    except ConfigError as e:
        fail(str(e))
    if folder is not None:
        print(f"tracking: {tracking.backend} in {folder}; open with: {tracking.opening(folder)}")


def write_report(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The compare's report.html in ``out_dir`` when ``cfg.report`` (the default); None otherwise."""
    if not cfg.report:
        return None
    from analysis.report import build_report

    return build_report([out_dir], out_dir)


def check(cfg: DictConfig, overrides: list[str]) -> dict[str, RunSpec]:
    """Validate every scheme's run config before anything starts; return each run's spec by its label."""
    seed_list(cfg)
    configs = scheme_configs(cfg, overrides)
    specs = {name: load_spec(sub) for name, sub in configs.items()}
    for name, dims in tuning.check_tuning(cfg, configs).items():  # tune=N: both ends of every range must run
        for values in tuning.edge_points(dims):
            try:
                load_spec(compose("config", tuning.trial_overrides(run_overrides(overrides), name, values)))
            except ConfigError as e:
                raise ConfigError(f"{tuning.GROUP}/{name}.yaml: {e.key}", e.problem) from None
    return specs


if __name__ == "__main__":
    if (seeds := swept_values(without_flags(sys.argv[1:]), "seed")) is not None:  # Hydra would say "Ambiguous value"
        start = "" if seeds[:1] in ([], ["0"]) else f"seed={seeds[0]} "
        fail(f"compare runs replications itself: use {start}seeds={len(seeds)} (seeds seed, seed+1, ...) "
             "instead of -m seed=...")
    launch(main, "compare", check, with_overrides=True)
