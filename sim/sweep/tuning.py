"""``python -m sim.compare tune=N``: every scheme of a compare gets the same budget of N Ray Tune trials of its own
settings, chosen on validation data only, before the compare runs the chosen settings over its seeds.

A scheme's search space sits next to its config, in ``conf/scheme_search/<scheme>.yaml`` (run-config keys such as
``training.lr`` or ``scheme.mu`` mapped to ``{choice|uniform|loguniform|randint: [...]}``, as in sweep files). Its
N trials are the run config's own settings first, then N - 1 draws from the space (seeded by the compare's seed
and the scheme's name, so the same command draws the same trials). Each trial is a whole simulation on the
compare's first seed, run in a Tune-reused process (one core, :class:`tune.PlacementGroupFactory`), its config
composed by Hydra from the compare's overrides and the trial's values. It is scored by :func:`validation_score`:
the mean over institutions of their validation accuracy at the round ``results.select`` picks (which is itself
chosen on validation data). Test rows are never read. The best score wins; a tie goes to the earlier trial, so the
run config's own settings stay unless a draw beats them.

Pure Python up to :func:`tune_trials`, which alone imports Ray Tune.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.cli import SEARCH_PATH, compose, config_folders, searchpath_override
from sim.core.types import GLOBAL, ConfigError, listing
from sim.sweep.space import Dimension, dimensions, draws, load_sweep, override_value

GROUP = "scheme_search"
"""The folder of conf/ (and of a user's config folders) holding each scheme's search space."""
OBJECTIVE = "val_score"
"""What a tuning trial reports: mean validation accuracy over institutions at their selected rounds."""
DIVERGED = -1.0
"""The score of a trial whose model diverged: below any accuracy, so it is never chosen over one that trained."""


def tune_count(cfg: DictConfig) -> int:
    """The compare's ``tune`` value: a whole number >= 0 (raises ConfigError naming ``tune``)."""
    n = cfg.get("tune", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError("tune", f"expected a whole number of trials per scheme >= 0 (0 = run every scheme at its "
                          f"config settings), got {n!r}")
    return n


def search_file(scheme: str) -> Path | None:
    """Where a scheme's search space is declared (conf/ first, then the user's config folders), or None."""
    return next((p for folder in config_folders() if (p := folder / GROUP / f"{scheme}.yaml").is_file()), None)


def search_space(scheme: str) -> tuple[Dimension, ...]:
    """The dimensions of a scheme's search space; a grid is read as a choice, since every trial is drawn."""
    path = search_file(scheme)
    where = f"{GROUP}/{scheme}.yaml"
    if path is None:
        raise ConfigError("tune", f"scheme {scheme} has no search space ({where} in conf/ or a --config-dir): every "
                          "scheme of a tuned compare gets the same budget, so add one or drop the scheme from schemes")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        dims = dimensions(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e.key.removeprefix('sweep.space').lstrip('.') or 'the space'}", e.problem) from None
    except Exception as e:  # noqa: BLE001 - unreadable YAML becomes one line naming the file
        raise ConfigError(where, f"cannot be read: {str(e).splitlines()[0]}") from None
    return tuple(replace(d, kind="choice") if d.kind == "grid" else d for d in dims)


def check_tuning(cfg: DictConfig, configs: Mapping[str, DictConfig]) -> dict[str, tuple[Dimension, ...]]:
    """Every scheme's search space, checked against its run config before anything starts ({} when tune=0).

    Refused in one line: tune not a whole number >= 0; a compare with variants or parts (they are settings
    of their own, not schemes with a search space); a scheme without a search space; a key of a space that its
    scheme's run config does not have; runs without validation data to choose on.
    """
    if not tune_count(cfg):
        return {}
    if cfg.get("variants") or cfg.get("parts"):
        raise ConfigError("tune", "tunes the schemes of a plain compare; variants and parts are settings of their own: "
                          "drop them, or tune=0")
    spaces = {}
    for name, sub in configs.items():
        spaces[name] = dims = search_space(name)
        missing = [d.key for d in dims if OmegaConf.select(sub, d.key, default=_ABSENT) is _ABSENT]
        if missing:
            raise ConfigError(f"{GROUP}/{name}.yaml: {missing[0]}", f"not a key of the {name} run config; use keys "
                              "that `python -m sim scheme=" + name + " --cfg job` prints, e.g. training.lr or scheme.<name>")
        if not float(OmegaConf.select(sub, "data.val_fraction", default=0.0) or 0.0) > 0:
            raise ConfigError("data.val_fraction", "tune=N chooses settings on validation data, and these runs keep "
                              "none; set data.val_fraction above 0")
    return spaces


_ABSENT = object()


def candidates(scheme: str, dims: tuple[Dimension, ...], sub: DictConfig, n: int, seed: int) -> list[dict[str, Any]]:
    """The scheme's ``n`` trials: its run config's own values, then ``n - 1`` draws (the same for the same seed)."""
    own = {d.key: OmegaConf.select(sub, d.key) for d in dims}
    if n <= 1:
        return [own][:n]
    spec = load_sweep({"space": {d.key: {d.kind: list(d.values)} for d in dims}, "search": "random",
                       "num_samples": n - 1, "seeds": [seed], "max_trials": max(1000, n)})
    return [own, *draws(spec, seed * 1_000_003 + zlib.crc32(scheme.encode()))]


def edge_points(dims: tuple[Dimension, ...]) -> list[dict[str, Any]]:
    """Trial values that together use every listed value and both ends of every range, for the pre-run check."""
    first = {d.key: d.values[0] for d in dims}
    return [first, *(first | {d.key: v} for d in dims for v in d.values[1:])]


def trial_overrides(base: list[str], scheme: str, values: Mapping[str, Any]) -> list[str]:
    """The overrides a trial's config is composed from: the compare's, the scheme, then the trial's values."""
    path = [searchpath_override(SEARCH_PATH)] if SEARCH_PATH else []
    return [*path, *base, f"scheme={scheme}", *(f"{k}={override_value(v)}" for k, v in values.items())]


def validation_score(metrics: pd.DataFrame) -> float:
    """Mean over institutions of the validation accuracy at each one's selected round; test rows are never read."""
    rows = metrics[(metrics["metric"] == "val_accuracy") & (metrics["institution"] != GLOBAL) & metrics["selected"]]
    return float(rows.groupby("institution")["value"].mean().mean()) if len(rows) else float("nan")


def run_trial(overrides: list[str]) -> dict[str, float]:
    """One tuning trial, in this process: compose, simulate, score on validation data."""
    from sim.engine import Diverged, run

    started = time.time()
    try:
        score, diverged = validation_score(run(compose("config", overrides), backend="inprocess").metrics), 0.0
    except Diverged:
        score, diverged = DIVERGED, 1.0
    return {OBJECTIVE: score, "diverged": diverged, "seconds": time.time() - started}


def settings_text(values: Mapping[str, Any]) -> str:
    """'training.lr=0.0312, training.local_epochs=2': a trial's values as a reader (and Hydra) reads them."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def choose(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per scheme: the trial with the best validation score (ties: the earlier trial), and its settings.

    ``trials`` has scheme, trial, values (a dict), val_score and diverged; nothing else is read.
    """
    rows = []
    for scheme, g in trials.groupby("scheme", sort=False):
        g = g.sort_values("trial")
        best = g.loc[g[OBJECTIVE].fillna(DIVERGED).idxmax()]
        own = g[g["trial"] == 0]
        rows.append({"scheme": scheme, "trials": len(g), "chosen_trial": int(best["trial"]),
                     "val_score": float(best[OBJECTIVE]),
                     "config_val_score": float(own[OBJECTIVE].iloc[0]) if len(own) else float("nan"),
                     "diverged": int(g["diverged"].sum()), "settings": settings_text(best["values"]),
                     "chosen_on": "validation", "values_json": json.dumps(dict(best["values"]), sort_keys=False),
                     "values": dict(best["values"])})
    return pd.DataFrame(rows)


def tune_trials(plan: Mapping[str, list[dict[str, Any]]], base: list[str], cluster: Mapping, out_dir: Path) -> pd.DataFrame:
    """Run every scheme's trials under Ray Tune (one core each, processes reused); one row per trial."""
    from ray import tune

    from agents.runtime.cluster import connect

    connect(dict(cluster), preload=())
    entries = [{"scheme": s, "trial": i, "values": v} for s, values in plan.items() for i, v in enumerate(values)]

    def trial(config: dict) -> None:
        from sim.sweep import quiet_when_ending

        sys.unraisablehook = quiet_when_ending  # this process may be ended, idle, by Tune
        c = config["candidate"]
        tune.report(run_trial(trial_overrides(base, c["scheme"], c["values"])))

    trial.__name__ = trial.__qualname__ = "tune_scheme"
    tuner = tune.Tuner(
        tune.with_resources(trial, tune.PlacementGroupFactory([{"CPU": 1.0}])),
        param_space={"candidate": tune.grid_search(entries)},
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", reuse_actors=True,
                                    trial_dirname_creator=lambda t: t.trial_id, trial_name_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(storage_path=str(out_dir.resolve()), name="tuning", verbose=0,
                                  callbacks=[_progress(len(entries))], failure_config=tune.FailureConfig(max_failures=0)))
    rows, failed = [], []
    for result in tuner.fit():
        c = result.config["candidate"]
        if result.error is not None:
            failed.append(f"{c['scheme']} ({settings_text(c['values'])}): {str(result.error).strip().splitlines()[-1]}")
            continue
        rows.append({"scheme": c["scheme"], "trial": c["trial"], "values": c["values"],
                     **{k: result.metrics.get(k) for k in (OBJECTIVE, "diverged", "seconds")}})
    if failed:
        raise RuntimeError(f"{len(failed)} tuning trial(s) failed; the first: {failed[0]}")
    order = {s: k for k, s in enumerate(plan)}
    return pd.DataFrame(rows).sort_values(["scheme", "trial"], key=lambda c: c.map(order) if c.name == "scheme" else c,
                                          ignore_index=True)


def _progress(total: int):
    """A Tune callback printing one line per finished tuning trial (Tune's own tables stay off)."""
    from ray import tune

    class Progress(tune.Callback):
        def setup(self, **info) -> None:
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.done += 1
            c, r = trial.config["candidate"], trial.last_result or {}
            score = r.get(OBJECTIVE)
            shown = "diverged" if r.get("diverged") else f"validation {score:.3f}" if isinstance(score, float) else "-"
            own = ", its config settings" if c["trial"] == 0 else ""  # trial numbers as tuned.csv's chosen_trial
            print(f"tuning {self.done}/{total}: {c['scheme']} trial {c['trial']} ({settings_text(c['values'])}{own})  "
                  f"{shown}", flush=True)

    return Progress()


def trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Every trial for tuning.csv: scheme, trial, settings, score, and one column per searched key."""
    values = pd.DataFrame(list(trials["values"]), index=trials.index)
    return pd.concat([trials.drop(columns="values").assign(settings=trials["values"].map(settings_text)), values], axis=1)


def read_choices(path: Path) -> dict[str, dict[str, Any]]:
    """The settings a tuned compare chose (tuned.csv), as {scheme: {key: value}}, to continue it with resume=true."""
    table = pd.read_csv(path)
    return {r.scheme: json.loads(r.values_json) for r in table.itertuples()}


def listed(spaces: Mapping[str, tuple[Dimension, ...]]) -> str:
    """'fedavg (training.lr, ...), ...': what each scheme searches, for the log."""
    return listing([f"{s} ({', '.join(d.key for d in dims)})" for s, dims in spaces.items()], limit=12)
