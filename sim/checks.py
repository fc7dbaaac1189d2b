"""Pre-run checks: a config becomes a :class:`~sim.core.config.RunSpec` that every layer below can run.

:func:`load_spec` is what every command, the Python API and the tests call. It types the
config (:func:`sim.core.config.parse_spec`, the bottom layer), then builds the scheme and
the model once in the driver and plans the placement, so that a bad key, a scheme that
cannot run with these institutions or a request the cluster cannot meet fails here, in one
line naming the key, before any actor starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Mapping

from sim.core import schema
from sim.core.config import RunSpec, parse_spec, spread_warning
from sim.core.types import ConfigError, spoken

if TYPE_CHECKING:
    import torch

__all__ = ["load_spec", "scheme_names"]


def scheme_names() -> dict[str, str]:
    """Each registered scheme's class path (a scheme group's ``_target_``) -> its registry name."""
    from agents.schemes import SCHEMES

    return {f"{cls.__module__}.{cls.__qualname__}": name for name, cls in SCHEMES.items()}


def load_spec(cfg: Any) -> RunSpec:
    """Validate a composed config end to end and freeze it into a RunSpec (raises ConfigError)."""
    from sim.tracking import parse as parse_tracking

    spec = parse_spec(cfg, scheme_names())
    parse_tracking(cfg.get("tracking") if isinstance(cfg, Mapping) else None)  # a backend that can write: before actors
    _check_groups(spec)
    return spec


def _check_groups(spec: RunSpec) -> None:
    """Build the scheme and model once in the driver so bad keys fail here, not in an actor."""
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import get_object

    from sim.core.data import check_data
    from sim.core.models import build_model

    from agents.schemes.base import checked
    from agents.wrappers import build

    schema.check_by_signature("scheme", spec.scheme, get_object(spec.scheme["_target_"]), schema.Field("int", 0))
    for group, cfg in spec.wrappers.items():  # aggregator, secagg, privacy, compression: their keys by signature
        schema.check_by_signature(group, cfg, _factory(group, cfg["_target_"]), schema.Field("int", 0))
    try:
        scheme = build(spec.scheme, spec.wrappers)  # a wrapper that cannot wrap this scheme refuses here, naming both
    except ConfigError:
        raise
    except (InstantiationException, TypeError, ValueError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        raise cause or ConfigError("scheme", _first_line(e)) from None
    # e.g. Krum's cohort bound, compute sharing's takers and givers: before any actor starts
    checked(scheme, [s for s in spec.scenario.institutions if spec.only is None or s.name in spec.only])
    if getattr(scheme, "asynchronous", False) and spec.engine.round_deadline_s is not None:
        raise ConfigError("engine.round_deadline_s", f"{spec.scheme_name} is asynchronous: no round waits for its "
                          "slowest member, so there is no deadline to miss; set engine.round_deadline_s=null")
    _check_models(spec, scheme)
    _check_views(spec, scheme)
    _check_dp_sgd(spec, scheme)
    _check_budget(spec, scheme)
    schema.check_data_types(spec.data)
    check_data(spec.data, spec.scenario, spec.model)
    spread_warning(spec)  # only now: a table that is refused gets its one line alone
    _check_shared_head(spec, scheme)  # after the data's own keys: a scenario of other institutions is the first fix
    if spec.select == "best_val" and not (spec.data.get("val_fraction") or 0) > 0:
        raise ConfigError("results.select", "best_val chooses each institution's round on its validation split, and "
                          "data.val_fraction is 0: set data.val_fraction (e.g. 0.15) or results.select=last")
    target = schema.check_value("model._target_", spec.model.get("_target_"), schema.Field("str"))
    schema.check_by_signature("model", spec.model, _factory("model", target), schema.Field("int", 1, schema.MAX_WIDTH))
    if target.startswith("sim.core.models.foundation."):
        from sim.core.data import TEXT
        from sim.core.models.foundation import check_config

        if spec.data.get("name") not in TEXT:  # a transformer embeds token ids; numeric features would fail mid-run
            raise ConfigError("model", f"{target} takes token ids, not data={spec.data.get('name')}; "
                              f"use a text dataset ({', '.join(f'data={t}' for t in TEXT)}) or a numeric model such as model=mlp")
        check_config(spec.model)  # pretrained folder, config.json, adapter and LoRA targets; reads no weights
    else:  # shapes are checked for real when the data is built; a meta-device probe (no memory) catches bad keys now
        with torch.device("meta"):
            probe = build_model(spec.model, (1, 8, 8) if spec.model.get("_target_", "").endswith("cnn") else (4,), 2, seed=0)
        _check_dp_model(spec, probe)
    for name, cfg in spec.models.items():  # institutions' own architectures: the same checks as the run's model
        _check_model(spec, f"scenario.institutions[{next(s.index for s in spec.scenario.institutions if s.model == name)}]"
                     f".model", cfg)
    _check_resources(spec)


def _check_models(spec: RunSpec, scheme: Any) -> None:
    """A scheme that averages weights needs one architecture: refuse institutions that declare their own (naming
    them); a scheme that distils needs data.public."""
    from agents.schemes.base import Distils
    from agents.wrappers.base import core

    taking = [s for s in spec.scenario.institutions if spec.only is None or s.name in spec.only]
    own = [s for s in taking if s.model is not None]
    name = core(scheme).name
    if own and not getattr(core(scheme), "mixed_models", False):
        from agents.schemes import SCHEMES

        mixed = [n for n, cls in SCHEMES.items() if getattr(cls, "mixed_models", False)]
        raise ConfigError(f"scenario.institutions[{own[0].index}].model", f"scheme={name} averages model weights, so "
                          f"every institution must train the run's model; {spoken(f'{s.name} ({s.model})' for s in own)} "
                          f"declare{'s' if len(own) == 1 else ''} another: use {', '.join(mixed[:-1])} or {mixed[-1]}, or remove their model")
    if isinstance(core(scheme), Distils) and spec.data.get("public") is None:
        raise ConfigError("data.public", f"scheme={name} distils on an unlabeled public set; set "
                          "data.public={source: heldout, rows: N} (rows no institution trains or tests on)")


def _check_model(spec: RunSpec, key: str, cfg: Any) -> None:
    """An institution's own model: its keys, and that it takes the data's inputs (a transformer needs text)."""
    import torch

    from sim.core.data import TEXT
    from sim.core.models import build_model

    target = schema.check_value(f"{key}._target_", cfg.get("_target_"), schema.Field("str"))
    schema.check_by_signature("model", cfg, _factory("model", target), schema.Field("int", 1, schema.MAX_WIDTH))
    if target.startswith("sim.core.models.foundation."):
        from sim.core.models.foundation import check_config

        if spec.data.get("name") not in TEXT:
            raise ConfigError(key, f"{target} takes token ids, not data={spec.data.get('name')}; use a numeric model")
        check_config(cfg)
    else:
        if spec.data.get("name") in TEXT:
            raise ConfigError(key, f"{target} takes numbers, not the token ids of data={spec.data.get('name')}; use a "
                              "text model (tiny_transformer, minilm)")
        with torch.device("meta"):
            build_model(cfg, (1, 8, 8) if target.endswith("cnn") else (4,), 2, seed=0)


def _check_views(spec: RunSpec, scheme: Any) -> None:
    """Views of the same entities (data.views) run isolated, split_learning or pooled, unwrapped, with MLP bottoms;
    split_learning needs views."""
    from agents.schemes.split_learning import VERTICAL
    from agents.wrappers.base import layers
    from sim.core.data.views import uses_views

    wrapped = layers(scheme)
    if wrapped and (uses_views(spec.data) or spec.scheme_name == "split_learning"):
        fix = "mean" if wrapped[-1].group == "aggregator" else "none"
        raise wrapped[-1].refuse("views exchange embeddings per batch, not models to merge (noise on them: "
                                 "scheme.embedding_noise)", f"set {wrapped[-1].group}={fix}")
    if not uses_views(spec.data):
        if spec.scheme_name == "split_learning":
            raise ConfigError("data.views", "split_learning trains a bottom model on each institution's view of the same "
                              "entities: set data.views={institution: [columns], ...} (data=table) or {institution: "
                              "text | code} (data=docstrings) and data.label_holder")
        return
    if spec.scheme_name not in VERTICAL:
        raise ConfigError("scheme", f"{spec.scheme_name} trains one model over one feature space; with data.views "
                          f"(institutions holding different columns of the same entities) use {', '.join(VERTICAL)}")
    if spec.model.get("_target_") != "sim.core.models.mlp":
        raise ConfigError("model", "views train an MLP bottom model on each view (tf-idf for text): use model=mlp")
    if importlib.util.find_spec("cryptography") is None:
        raise ConfigError("data.views", "aligning the institutions' entities (private set intersection over Curve25519) "
                          "needs the cryptography package: pip install -c constraints.txt -e '.[vertical]'")


def _check_budget(spec: RunSpec, scheme: Any) -> None:
    """Client-level DP solved for a target epsilon over planned_rounds must not run more rounds: it would spend more."""
    from agents.wrappers.base import layers
    from agents.wrappers.privacy import ClientDP

    dp = next((w for w in layers(scheme) if isinstance(w, ClientDP)), None)
    if dp is None or dp.target_epsilon is None or dp.planned_rounds >= spec.rounds:
        return
    raise ConfigError(f"{dp.prefix}.planned_rounds", f"the noise is calibrated for epsilon {float(dp.target_epsilon):g} "
                      f"over {dp.planned_rounds} rounds, and the run has rounds={spec.rounds}, which would spend epsilon "
                      f"{dp.epsilon(spec.rounds):.1f}; set {dp.prefix}.planned_rounds={spec.rounds} or rounds="
                      f"{dp.planned_rounds}")


def _check_dp_sgd(spec: RunSpec, scheme: Any) -> None:
    """DP-SGD (sim.core.dp_sgd, Opacus) needs local SGD steps, in fp32, on a numeric model (not a transformer)."""
    private = next((s for s in spec.scenario.institutions if s.private), None)
    if private is None:
        return
    key = f"scenario.institutions[{private.index}].dp_noise_multiplier"
    plan = scheme.plan(1)
    one_step = not getattr(plan.client, "local_sgd", True)
    if one_step or plan.upload == "data":
        raise ConfigError(key, f"DP-SGD privatises local SGD steps, but scheme {spec.scheme.get('_target_')} sends "
                          f"{'a full-shard gradient' if one_step else 'raw data'}; use a weights-sending scheme")
    if str(spec.model.get("_target_", "")).startswith("sim.core.models.foundation."):
        raise ConfigError(key, "DP-SGD is not supported for text/transformer models; use a numeric model (model=mlp)")
    if spec.training.precision != "fp32":
        raise ConfigError("training.precision", "DP-SGD computes per-sample gradients in fp32; set it to fp32")


def _check_shared_head(spec: RunSpec, scheme: Any) -> None:
    """Refuse a scheme that scores every institution on one shared model when each has a label space of its own
    (data=docstrings, task=subpackage): one head over all of them answers a question the task does not pose."""
    from agents.schemes.base import personal, personal_schemes
    from agents.wrappers.base import core
    from sim.core.data.docstrings import own_label_spaces

    if not own_label_spaces(spec.data) or personal(core(scheme)):
        return
    allowed = personal_schemes()
    name = core(scheme).name
    how = " adapting nothing before scoring" if name in allowed else ""  # finetune/reptile with 0 steps: FedAvg
    raise ConfigError("scheme", f"data.task=subpackage gives each institution its own label space, and scheme={name}"
                      f"{how} trains one shared head over all of them; use {', '.join(allowed[:-1])} or "
                      f"{allowed[-1]}, or data.task=kind for one shared task")


def _check_dp_model(spec: RunSpec, model: torch.nn.Module) -> None:
    """A private institution's model must be one Opacus computes per-sample gradients for (no BatchNorm, ...)."""
    from sim.core import dp_sgd

    private = next((s for s in spec.scenario.institutions if s.private), None)
    if private is not None and (why := dp_sgd.unsupported(model)):
        raise ConfigError("model", f"DP-SGD (scenario.institutions[{private.index}].dp_noise_multiplier) cannot "
                          f"train {spec.model.get('_target_')}: {why}; use a model without it (e.g. model=mlp)")


EXAMPLES = {"model": "sim.core.models.mlp", "aggregator": "agents.wrappers.robust.Median",
            "secagg": "agents.wrappers.secagg.SecureAggregation", "privacy": "agents.wrappers.privacy.ClientDP",
            "compression": "agents.wrappers.compression.Compression"}
"""A factory each group with a ``_target_`` can name, for messages."""


def _factory(group: str, target: str) -> Any:
    """The factory (a model's, a wrapper's) ``target`` names, imported quietly: Hydra's own lookup logs a multi-line
    error."""
    module, _, name = str(target).rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{group}._target_", f"cannot import {target!r} ({type(e).__name__}); "
                          f"check the spelling, e.g. {EXAMPLES[group]}") from None
    if not callable(factory):
        raise ConfigError(f"{group}._target_", f"{target!r} is not a factory; use e.g. {EXAMPLES[group]}")
    return factory


def _check_resources(spec: RunSpec) -> None:
    """Refuse a bad cluster address, and on a local cluster any request its CPUs and GPUs cannot meet, before Ray starts.

    The local cluster's size is cluster.num_cpus / num_gpus, or when null what this machine has.
    """
    from agents.runtime.placement import check_requests, plan_layout

    if spec.cluster.get("address") is not None:
        return  # a remote cluster's size is known only once joined; plan_layout checks it then
    check_dashboard(spec.cluster)
    cpus, gpus = spec.cluster.get("num_cpus"), spec.cluster.get("num_gpus")
    cpus = float(os.cpu_count() or 1) if cpus is None else float(cpus)
    gpus = float(_local_gpus()) if gpus is None else float(gpus)
    check_requests(spec, spec.scenario.institutions, cpus, gpus)
    plan_layout(spec, spec.scenario.institutions, cpus, gpus)


def check_dashboard(cluster: Mapping[str, Any]) -> None:
    """Refuse cluster.dashboard=true for a local cluster when Ray's dashboard packages are missing (Ray would start
    without it, or fail, after the run had begun)."""
    import importlib.util

    if cluster.get("dashboard") and not cluster.get("address"):
        missing = [m for m in DASHBOARD_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("cluster.dashboard", f"Ray's dashboard needs packages this environment lacks "
                              f"({', '.join(missing)}): pip install 'ray[default]', or leave cluster.dashboard=false")


DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client")
"""What ``ray[default]`` adds that Ray's dashboard imports."""


def _local_gpus() -> int:
    """GPUs torch sees on this machine (what a local Ray cluster would offer)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0



def _first_line(e: BaseException) -> str:
    """The most specific line of a (possibly chained) exception."""
    inner = e.__cause__ or e
    return str(inner).strip().splitlines()[-1] if str(inner).strip() else type(inner).__name__
