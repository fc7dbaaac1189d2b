"""A sweep's trials tracked as they report, through Ray Tune's own logger callbacks (``tracking=mlflow|tensorboard``).

Tune's :class:`~ray.air.integrations.mlflow.MLflowLoggerCallback` and
:class:`~ray.tune.logger.TBXLoggerCallback` log every result a trial reports (one per round)
from the driver. Two things are ours: a trial's params are its whole resolved config (Tune's
trial config holds only the swept values and the seed), and TensorBoard's event files go to the
tracking folder (Tune's callback writes them into Tune's own trial folder). The sweep itself is
one more run, holding the summary table (:func:`track_sweep`); in MLflow the trials nest under it.
A resumed sweep keeps the callbacks it started with (Tune restores them) and, from
``tracking.json`` in the sweep directory, the same parent run or log folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import TBXLoggerCallback

from sim.core.results import write_text
from sim.tracking import MAX_PARAM, MLflowStore, Tracking, allow_file_store, fresh, key, open_store, table_record

STATE = "tracking.json"  # in the sweep directory: where its trials are tracked, for the summary and a resume
Describe = Callable[[Mapping[str, Any]], tuple[dict[str, Any], dict[str, str]]]
"""A trial's Tune config -> (its resolved config flattened, its tags: run_id, scheme, seed)."""


class TrialsToMLflow(MLflowLoggerCallback):
    """Tune's MLflow callback, logging each trial's resolved config as its params and its run id, scheme and seed as
    tags (nested under the sweep's run through ``tags``)."""

    def __init__(self, uri: str, experiment: str, describe: Describe, tags: Mapping[str, str]):
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags=dict(tags))
        self.describe = describe

    def setup(self, *args, **kwargs) -> None:
        allow_file_store()  # the driver that restores a sweep is a new process
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return
        params, tags = self.describe(trial.config)
        run = self.mlflow_util.start_run(tags={**self.tags, **tags, "trial_name": str(trial)},
                                         run_name=f"{trial.trial_id}-{tags.get('run_id', '')}")
        self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=run.info.run_id,
                                    params_to_log={key(k): str(v)[:MAX_PARAM] for k, v in params.items()})


class TrialsToTensorBoard(TBXLoggerCallback):
    """Tune's TensorBoardX callback, writing each trial's events into ``folder/<trial id>-<run id>`` (Tune's own
    writes them into its trial folder) with the trial's resolved config as text."""

    def __init__(self, folder: Path, describe: Describe):
        super().__init__()
        self.folder, self.describe = folder, describe

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_writer:  # Tune's own bookkeeping: a restarted trial gets a fresh writer
            self._trial_writer[trial].close()
        params, tags = self.describe(trial.config)
        writer = self._summary_writer_cls(str(self.folder / f"{trial.trial_id}-{tags.get('run_id', '')}"),
                                          flush_secs=30)
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        self._trial_writer[trial] = writer
        self._trial_result[trial] = {}


def callbacks(tracking: Tracking, sweep_dir: Path, name: str, describe: Describe, resume: bool) -> list:
    """The Tune callbacks that track a sweep's trials (none when tracking is off); writes ``tracking.json``."""
    if not tracking.on:
        return []
    folder = tracking.folder(sweep_dir)
    state = json.loads((sweep_dir / STATE).read_text()) if resume and (sweep_dir / STATE).is_file() else {}
    store = open_store(tracking, folder)
    tags = {"kind": "trial", "sweep": name}
    if isinstance(store, MLflowStore):
        if "parent" not in state:  # a resumed sweep keeps its run
            state["parent"] = store.start(f"sweep-{name}", {"kind": "sweep", "sweep": name})
        nested = tags | {"mlflow.parentRunId": state["parent"]}
        made = [TrialsToMLflow(store.uri, tracking.experiment, describe, nested)]
    else:
        if "group" not in state:
            state["group"] = fresh(folder, f"sweep-{name}")
        made = [TrialsToTensorBoard(folder / state["group"], describe)]
    write_text(json.dumps(state | {"backend": tracking.backend, "folder": str(folder)}), sweep_dir / STATE)
    return made


def track_sweep(tracking: Tracking, sweep_dir: Path, config: Any, summary: pd.DataFrame, text: str) -> Path | None:
    """Log the sweep's own run: its config, the summary table (numbers and text), summary.csv and trials.csv."""
    if not tracking.on or not (sweep_dir / STATE).is_file():
        return None
    state = json.loads((sweep_dir / STATE).read_text())
    folder = Path(state["folder"])
    record = table_record(f"sweep-{sweep_dir.name}", config, summary, text,
                          [sweep_dir / "summary.csv", sweep_dir / "trials.csv", sweep_dir / "config.yaml"])
    store = open_store(tracking, folder)
    if isinstance(store, MLflowStore):
        store.log(record, run=state["parent"])
    else:
        store.log(record, f"{state['group']}/summary")
    return folder
