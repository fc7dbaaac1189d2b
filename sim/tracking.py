"""Experiment tracking: runs, compares and sweeps logged to a local MLflow file store or TensorBoard event files.

``tracking=mlflow|tensorboard|none`` (conf/tracking/, none by default). No server is started:
MLflow writes a file store, TensorBoard event files (tensorboardX), into ``tracking.dir`` or,
by default, ``mlruns/`` or ``tensorboard/`` inside the run directory. Each run is logged with its
params (the resolved config, flattened to dotted keys), its per-round metrics (every row of
metrics.parquet as ``INSTITUTION/METRIC`` and the ledger's round totals, step = round), its
summary (final selected accuracies, megabytes) and its files (config, summary, a compare's
report.html) as artifacts.

A run and a compare are logged once their run directories are written, from those
directories: tracking reads results and never touches the simulation, so it cannot move a
number. A sweep's trials are logged as they report, through Ray Tune's logger callbacks
(:mod:`sim.sweep.tracked`); this module holds what both share and imports no Ray.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.core.schema import Field, check_group
from sim.core.types import ConfigError

BACKENDS = ("none", "mlflow", "tensorboard")
FOLDERS = {"mlflow": "mlruns", "tensorboard": "tensorboard"}  # the default folder inside the run directory
FIELDS = {"backend": Field("str", choices=BACKENDS), "dir": Field("str", null=True), "experiment": Field("str")}
MODULES = {"mlflow": ("mlflow", "pip install 'collabsim[track]'"),  # what each backend imports, and how to get it
           "tensorboard": ("tensorboardX", "pip install tensorboardX")}
MAX_PARAM = 6000  # MLflow's longest parameter value (characters); longer ones are cut


@dataclass(frozen=True)
class Tracking:
    """Where a command logs: the backend, its folder (None: inside the run directory) and MLflow's experiment."""

    backend: str = "none"
    dir: str | None = None
    experiment: str = "collabsim"

    @property
    def on(self) -> bool:
        """Whether anything is logged."""
        return self.backend != "none"

    def folder(self, out_dir: str | Path) -> Path:
        """The store (MLflow) or log folder (TensorBoard): ``tracking.dir``, else its default inside ``out_dir``."""
        return Path(self.dir).expanduser().resolve() if self.dir else Path(out_dir).resolve() / FOLDERS[self.backend]

    def opening(self, folder: Path) -> str:
        """The command that opens ``folder`` in the backend's own viewer."""
        if self.backend == "mlflow":
            return f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {folder.as_uri()}"
        return f"tensorboard --logdir {folder}"


def parse(node: Any) -> Tracking:
    """The ``tracking`` group of a config, checked (raises ConfigError): a known backend that is installed, and a
    ``tracking.dir`` this process can create and write files in. A config without the group tracks nothing."""
    if node is None:
        return Tracking()
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    check_group("tracking", node, FIELDS)
    tracking = Tracking(**node)
    if not tracking.on:
        return tracking
    module, install = MODULES[tracking.backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigError("tracking", f"{tracking.backend} needs the {module} package, which is not installed: "
                          f"{install}")
    if tracking.dir is not None:
        check_writable(tracking.folder("."))
    return tracking


def check_writable(folder: Path) -> None:
    """Refuse a folder that cannot be made or written in, by trying: its nearest existing folder takes a temporary
    file (permission bits alone say nothing to root, nor about a read-only file system)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("tracking.dir", f"{existing} is a file, not a folder; choose another tracking.dir")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".collabsim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError("tracking.dir", f"{folder} is not writable (no file can be made in {existing}: "
                          f"{e.strerror or type(e).__name__}); "
                          "choose a folder you can write to, or leave tracking.dir=null for one inside the run "
                          "directory") from None


# ---- what is logged --------------------------------------------------------------------------------

@dataclass
class Record:
    """One tracked run: params, per-round series (key, step, value), summary numbers, texts and files."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    series: list[tuple[str, int, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact name -> its text (summary.txt)
    files: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``training.lr``, ``scenario.institutions.0.name``); lists of plain values
    stay one value."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        items = cfg.items()
    elif isinstance(cfg, (list, tuple)) and any(isinstance(x, (Mapping, list, tuple)) for x in cfg):
        items = enumerate(cfg)
    else:
        return {prefix: cfg} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in items:
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^\w\-. /:]", "_", name)


def run_record(run_dir: Path, name: str | None = None) -> Record:
    """What a run directory says, ready to log: its config, every per-round metric, the ledger's round totals and
    the final (selected) numbers."""
    from analysis.metrics import GLOBAL, final_table, run_costs

    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    ledger = pd.read_parquet(run_dir / "ledger.parquet")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    first = metrics.iloc[0] if len(metrics) else {}
    record = Record(name or str(first.get("run_id", run_dir.name)), params=flatten(config),
                    files=[run_dir / "config.yaml"],
                    tags={k: str(first[k]) for k in ("run_id", "scheme", "scenario", "seed") if k in first})
    record.series = [(f"{i}/{m}", int(r), float(v)) for i, m, r, v in
                     metrics[["institution", "metric", "round", "value"]].itertuples(index=False)]
    rounds = ledger.groupby("round")
    totals = {"ledger/megabytes": (rounds["bytes_up"].sum() + rounds["bytes_down"].sum()) / 1e6,
              "ledger/sim_time": rounds["sim_time"].max(), "ledger/epsilon": rounds["epsilon"].max()}
    record.series += [(k, int(r), float(v)) for k, s in totals.items() for r, v in s.items()]
    final = final_table(metrics)
    record.summary = {f"final/{i}/accuracy": float(a) for i, a in zip(final["institution"], final["accuracy"])}
    mine = final[final["institution"] != GLOBAL]["accuracy"]
    if len(mine):
        record.summary |= {"final/mean_accuracy": float(mine.mean()), "final/worst_accuracy": float(mine.min())}
    costs = run_costs(ledger)
    if len(costs):
        record.summary |= {f"final/{c}": float(costs[c].iloc[0]) for c in ("megabytes", "simulated_duration")}
    return record


def table_record(name: str, config: Any, table: pd.DataFrame, text: str, files: list[Path]) -> Record:
    """A command's own record (a compare's, a sweep's): its config, each row's numbers as ``LABEL/COLUMN``, and the
    printed table as summary.txt."""
    label = [c for c in ("scenario", "scheme") if c in table] or list(table.columns[:1])
    summary = {}
    for row in table.to_dict("records"):
        prefix = "/".join(str(row[c]) for c in label)
        summary |= {f"{prefix}/{c}": float(v) for c, v in row.items()
                    if c not in label and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Record(name, params=flatten(config), summary=summary, texts={"summary.txt": text},
                  files=[f for f in files if f.is_file()])


# ---- the backends ----------------------------------------------------------------------------------

def open_store(tracking: Tracking, folder: Path):
    """The backend's writer for ``folder``: :class:`MLflowStore` or :class:`TensorBoardLogs`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # checked before the run; the folder may have gone since
        raise ConfigError("tracking.dir", f"cannot make {folder} ({e.strerror or type(e).__name__}); the results are "
                          "in the run directory: choose a writable tracking.dir") from None
    return MLflowStore(folder, tracking.experiment) if tracking.backend == "mlflow" else TensorBoardLogs(folder)


def allow_file_store() -> None:
    """MLflow 3 keeps its file store in maintenance mode and refuses it unless asked: we ask (pinned MLflow, no
    server, no database to set up); ``mlflow migrate-filestore`` turns a store into SQLite when wanted."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class MLflowStore:
    """Runs in an MLflow file store, written through MLflow's own client."""

    def __init__(self, folder: Path, experiment: str):
        allow_file_store()
        from mlflow.tracking import MlflowClient

        self.uri = folder.as_uri()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the file store's maintenance-mode notice, on every call
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment = found.experiment_id if found else self.client.create_experiment(experiment)

    def start(self, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
        """A new run (nested under ``parent``); its id."""
        extra = {"mlflow.parentRunId": parent} if parent else {}
        return self.client.create_run(self.experiment, run_name=name, tags={**tags, **extra}).info.run_id

    def log(self, record: Record, parent: str | None = None, run: str | None = None) -> str:
        """Log ``record`` into a new run (or ``run``) and end it; the run's id."""
        from mlflow.entities import Metric, Param

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run or self.start(record.name, record.tags, parent)
            now = int(time.time() * 1000)
            params = [Param(key(k), str(v)[:MAX_PARAM]) for k, v in record.params.items()]
            metrics = [Metric(key(k), v, now, s) for k, s, v in record.series if math.isfinite(v)]
            metrics += [Metric(key(k), v, now, 0) for k, v in record.summary.items() if math.isfinite(v)]
            for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
                self.client.log_batch(run, params=params[i:i + 100])
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run, metrics=metrics[i:i + 1000])
            for name, text in record.texts.items():
                self.client.log_text(run, text, name)
            if "summary.txt" in record.texts:  # shown as the run's description in MLflow's UI
                self.client.set_tag(run, "mlflow.note.content", f"```\n{record.texts['summary.txt']}\n```")
            for path in record.files:
                self.client.log_artifact(run, str(path))
            self.client.set_terminated(run)
        return run


class TensorBoardLogs:
    """One TensorBoard run (a folder of event files) per record, written with tensorboardX."""

    def __init__(self, folder: Path):
        self.folder = folder

    def log(self, record: Record, where: str) -> Path:
        """Write ``record`` into ``folder/where``: scalars per step, the summary at the last step, params as hparams
        and as text, texts as text."""
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        path = self.folder / where
        last = max((s for _, s, _ in record.series), default=0)
        with SummaryWriter(str(path)) as w:
            for k, s, v in record.series:
                if math.isfinite(v):
                    w.add_scalar(k, v, global_step=s)
            summary = {k: v for k, v in record.summary.items() if math.isfinite(v)}
            for k, v in summary.items():
                w.add_scalar(k, v, global_step=last)
            if record.params:  # HParams dashboard: the flattened config against the summary numbers
                plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in record.params.items()
                         if v is not None}
                for s in hparams(plain, summary):
                    w.file_writer.add_summary(s)
                w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in record.params.items()))
            for name, text in record.texts.items():
                w.add_text(name, "\n".join(f"    {line}" for line in text.splitlines()))  # indented: monospace
        return path


def fresh(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : a subfolder of ``folder`` that does not exist yet."""
    n, out = 1, name
    while (folder / out).exists():
        n += 1
        out = f"{name}-{n}"
    return out


# ---- the commands ----------------------------------------------------------------------------------

def track_run(tracking: Tracking, run_dir: Path, summary_text: str) -> Path | None:
    """Log one run (``python -m sim``) from its directory; the folder written to (None when tracking is off)."""
    if not tracking.on:
        return None
    folder = tracking.folder(run_dir)
    record = run_record(Path(run_dir))
    record.texts["summary.txt"] = summary_text
    record.tags["kind"] = "run"
    store = open_store(tracking, folder)
    if isinstance(store, MLflowStore):
        store.log(record)
    else:
        store.log(record, fresh(folder, record.name))
    return folder


def track_compare(tracking: Tracking, out_dir: Path, config: Any, table: pd.DataFrame, text: str,
                  report: Path | None) -> Path | None:
    """Log a compare: one run per scheme and seed (nested under the compare's own in MLflow, in its folder in
    TensorBoard), and the compare's run with the summary table, summary.csv and report.html."""
    if not tracking.on:
        return None
    out_dir = Path(out_dir)
    folder = tracking.folder(out_dir)
    files = [out_dir / "summary.csv", out_dir / "config.yaml", *([report] if report else [])]
    record = table_record(f"compare-{out_dir.name}", config, table, text, files)
    record.tags["kind"] = "compare"
    runs = sorted(p for p in (out_dir / "runs").glob("*") if (p / "metrics.parquet").is_file())
    store = open_store(tracking, folder)
    if isinstance(store, MLflowStore):
        parent = store.start(record.name, record.tags)
        for run in runs:
            store.log(_child(run_record(run, run.name), "run"), parent=parent)
        store.log(record, run=parent)
    else:
        group = fresh(folder, "compare")
        for run in runs:
            store.log(_child(run_record(run, run.name), "run"), f"{group}/{run.name}")
        store.log(record, f"{group}/summary")
    return folder


def _child(record: Record, kind: str) -> Record:
    """``record`` tagged with its kind."""
    record.tags["kind"] = kind
    return record
