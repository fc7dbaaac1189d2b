"""Text datasets: the docstrings corpus, the user's own text file, and tokenisation into shards."""

from __future__ import annotations

import logging
import re
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sim.core.data import build_federation, check_data, defaults, docstrings
from sim.core.scenario import build_scenario
from sim.cli import compose
from sim.checks import load_spec
from sim.core.types import ConfigError, InstitutionSpec, Scenario

ROOT = Path(__file__).resolve().parents[2]
MINILM = {"_target_": "sim.core.models.foundation.minilm"}  # load_tokenizer needs only the dict, not the factory
SKIMAGE = tuple(p for p in docstrings.PACKAGES if p[0] == "scikit-image")  # the smallest package: builds in ~1 s


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The full corpus, built once per session into a fresh cache; (folder, rows, build seconds)."""
    folder = tmp_path_factory.mktemp("corpus")
    start = time.perf_counter()
    df = docstrings.corpus(folder)
    return folder, df, time.perf_counter() - start


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's real tokenizer (local files; no download)."""
    from sim.core.models.foundation import load_tokenizer

    return load_tokenizer(MINILM)


def package_scenario(names=None) -> Scenario:
    """scenario=docstrings as shipped (or only the named institutions, shares renormalised)."""
    cfg = yaml.safe_load((ROOT / "conf" / "scenario" / "docstrings.yaml").read_text())
    if names is not None:
        cfg["institutions"] = [dict(r, share=1 / len(names)) for r in cfg["institutions"] if r["name"] in names]
    return build_scenario(cfg, seed=0)


def sites(*names, feature_skew=0.0) -> Scenario:
    """A scenario of equally sized institutions with these names."""
    return Scenario("t", tuple(InstitutionSpec(index=i, name=n, discipline="d", share=1 / len(names),
                                               feature_skew=feature_skew) for i, n in enumerate(names)))


def docs(corpus_dir, **over) -> dict:
    """The docstrings data config reading the session's cache."""
    return defaults("docstrings") | {"cache_dir": str(corpus_dir[0])} | over


# --- The corpus -------------------------------------------------------------------------------

def test_corpus_is_about_21000_unique_public_first_paragraphs(corpus_dir):
    _, df, _ = corpus_dir  # build time is reported, not asserted: ~22 CPU-seconds, wall time depends on the box
    assert list(df.columns) == list(docstrings.COLUMNS)
    assert 18_000 <= len(df) <= 25_000  # 21,367 with the pinned releases; a rule change would move it far
    assert df["text"].is_unique
    counts = df["package"].value_counts()
    assert set(counts.index) == {p[0] for p in docstrings.PACKAGES} and counts.min() >= 300
    assert set(df["kind"]) == {"module", "class", "function", "method"}
    assert (df["text"].str.len() >= docstrings.MIN_CHARS).all()
    assert not df["text"].str.contains(r"\n|  ").any()  # first paragraph only, whitespace-normalised
    # private: a directory or a class/function name starting with "_" (module files may: sklearn's _base.py)
    assert not df["subpackage"].str.startswith("_").any() and not df["qualname"].str.contains(r"\._lib\.").any()
    assert not df.loc[df["kind"] != "module", "qualname"].str.contains(r"\._[^.]*$").any()
    assert not df["qualname"].str.contains(r"\.tests?\.").any()


def test_cache_is_reused_without_rebuilding_and_carries_the_rows_digest(corpus_dir, monkeypatch):
    folder, df, _ = corpus_dir
    import sim.core.models.foundation as foundation

    monkeypatch.setattr(docstrings, "build_corpus", lambda *a: pytest.fail("the cache should have been used"))
    monkeypatch.setattr(foundation, "load_tokenizer", lambda *a: pytest.fail("checks never tokenise"))
    again = docstrings.corpus(folder)
    pd.testing.assert_frame_equal(again, df)
    meta = pq.read_schema(docstrings.cache_path(folder)).metadata
    assert meta[docstrings.DIGEST_KEY].decode() == docstrings.rows_digest(df)
    check_data(docs(corpus_dir), package_scenario())  # the cheap check reads the cache, never rebuilds


def test_corpus_is_deterministic():
    assert docstrings.rows_digest(docstrings.build_corpus(SKIMAGE)) == \
        docstrings.rows_digest(docstrings.build_corpus(SKIMAGE))


@pytest.mark.parametrize("damage", ["edited row", "truncated file"])
def test_a_damaged_cache_is_rebuilt(tmp_path, caplog, damage):
    # Prepare: a good cache of one package, then damage it
    good = docstrings.corpus(tmp_path, SKIMAGE)
    path = docstrings.cache_path(tmp_path, SKIMAGE)
    if damage == "edited row":  # the rows change but the stored digest does not
        table = pq.read_table(path)
        edited = table.to_pandas()
        edited.loc[0, "text"] = "Something else entirely, but long enough."
        pq.write_table(pq.read_table(path).from_pandas(edited, preserve_index=False)
                       .replace_schema_metadata(table.schema.metadata), path)
    else:
        path.write_bytes(path.read_bytes()[:200])
    # Execute
    with caplog.at_level(logging.WARNING, logger="sim.core.data.docstrings"):
        rebuilt = docstrings.corpus(tmp_path, SKIMAGE)
    # Assert: the damage is reported and the original rows come back (and are cached again)
    assert "damaged" in caplog.text
    pd.testing.assert_frame_equal(rebuilt, good)
    assert docstrings._read(path) is not None


def test_pinned_versions_match_the_corpus_extra_of_pyproject():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["corpus"]
    assert sorted(extra) == sorted(f"{dist}=={pinned}" for dist, _, pinned, _ in docstrings.PACKAGES)


def test_another_installed_version_is_refused_with_the_install_line(monkeypatch, corpus_dir):
    old = [("scipy", "scipy", "0.1.0", "scientific computing"), *docstrings.PACKAGES[1:]]
    monkeypatch.setattr(docstrings, "PACKAGES", tuple(old))
    with pytest.raises(ConfigError, match=r"data.name: .*scipy==0.1.0 but it is 1.*collabsim\[corpus\]"):
        check_data(docs(corpus_dir), package_scenario())


# --- Tasks and tokenisation ----------------------------------------------------------------------

def test_subpackage_task_tokenises_once_into_int64_shards_with_per_institution_label_spaces(
        corpus_dir, tokenizer, monkeypatch):
    # Prepare: count tokenizer calls
    import sim.core.models.foundation as foundation

    calls = []

    def counting(texts, **kw):
        calls.append(len(texts))
        return tokenizer(texts, **kw)

    monkeypatch.setattr(foundation, "load_tokenizer", lambda model: counting)
    scenario = package_scenario()
    # Execute
    fed = build_federation(docs(corpus_dir, task="subpackage"), scenario, seed=0, model=MINILM)
    # Assert: one tokenizer call for every row any institution holds, int64 ids (max_length,)
    assert calls == [sum(s.num_train + len(s.y_val) + len(s.y_test) for s in fed.shards)]
    assert fed.input_shape == (32,)
    _, classes = docstrings.labels(docstrings.corpus(corpus_dir[0]), docs(corpus_dir, task="subpackage"))
    assert fed.num_classes == len(classes) > 8 * 2
    held = []
    for spec, shard in zip(scenario.institutions, fed.shards):
        assert shard.x_train.dtype == shard.x_test.dtype == np.int64 and shard.x_train.shape[1] == 32
        assert shard.num_train + len(shard.y_val) + len(shard.y_test) == 400  # max_rows_per_institution; every package has more
        assert (shard.x_train[:, 0] == tokenizer.cls_token_id).all()
        module = next(m for d, m, _, _ in docstrings.PACKAGES if d == spec.name)
        labels = {classes[i] for i in np.concatenate([shard.y_train, shard.y_val, shard.y_test])}
        assert len(labels) >= 2 and all(label.startswith(module + ".") for label in labels)
        held.append(labels)
    assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1:])  # label spaces are disjoint


def test_ids_are_the_tokenizers_ids_of_the_rows_text(corpus_dir, tokenizer):
    data = docs(corpus_dir, max_rows_per_institution=None)
    fed = build_federation(data, package_scenario(["scikit-image", "networkx"]), seed=0, model=MINILM)
    texts = docstrings.corpus(corpus_dir[0]).query("package == 'scikit-image'")["text"]
    shard = next(s for s in fed.shards if s.name == "scikit-image")
    assert shard.num_train + len(shard.y_val) + len(shard.y_test) == len(texts)  # all rows: the institution holds its whole package
    want = tokenizer(list(texts), padding="max_length", truncation=True, max_length=32, return_tensors="np")
    ours = {tuple(r) for r in np.concatenate([shard.x_train, shard.x_val, shard.x_test])}
    assert ours == {tuple(r) for r in want["input_ids"]}


def test_discipline_task_shares_one_label_space_over_any_institutions(corpus_dir):
    data = docs(corpus_dir, task="discipline", partition="iid")
    fed = build_federation(data, sites("a", "b", "c"), seed=0, smoke=True, model=MINILM)
    assert fed.num_classes == 8
    for shard in fed.shards:
        assert shard.num_train + len(shard.y_val) + len(shard.y_test) == 60  # smoke
        assert len(np.unique(shard.y_train)) >= 6  # iid over 8 disciplines, 48 train rows
    again = build_federation(data, sites("a", "b", "c"), seed=0, smoke=True, model=MINILM)
    assert all(np.array_equal(s.x_train, t.x_train) and np.array_equal(s.y_test, t.y_test)
               for s, t in zip(fed.shards, again.shards))


KINDS = ["class", "function", "method", "module"]


def kinds_held(pool, df) -> list[dict]:
    """Per institution: its rows' (package, kind) from the corpus, looked up by text (texts are unique)."""
    by_text = df.set_index("text")[["package", "kind"]]
    return [by_text.loc[pool.x[np.concatenate([tr, te])]] for tr, te in pool.parts]


def test_kind_task_gives_every_package_its_own_docstrings_in_one_shared_label_space(corpus_dir):
    # Prepare: every row of every package, no cap
    _, df, _ = corpus_dir
    scenario = package_scenario()
    # Execute
    pool = docstrings.build(docs(corpus_dir, task="kind", max_rows_per_institution=None), scenario, seed=0)
    # Assert: four labels, the same ids for everybody (label i is KINDS[i] in every institution), each package's
    # docstrings at the institution named like it, all of them: the corpus's own sizes and mix
    assert pool.num_classes == 4 and docstrings.labels(df, {"task": "kind"})[1] == KINDS
    for spec, (tr, te), held in zip(scenario.institutions, pool.parts, kinds_held(pool, df)):
        assert (held["package"] == spec.name).all()
        assert [KINDS[i] for i in pool.y[np.concatenate([tr, te])]] == list(held["kind"])
        natural = df.loc[df["package"] == spec.name, "kind"].value_counts().sort_index()
        assert held["kind"].value_counts().sort_index().equals(natural)
    sizes = [len(tr) + len(te) for tr, te in pool.parts]
    assert min(sizes) == 550 and max(sizes) == 7091  # scikit-image and sympy: the imbalance between them stays


def test_kind_task_caps_each_package_keeping_its_mix_in_train_and_test(corpus_dir):
    # Prepare: the shipped cap of 400 rows; scikit-image has 27 classes to 433 functions
    _, df, _ = corpus_dir
    scenario = package_scenario()
    data = docs(corpus_dir, task="kind")
    # Execute
    pool = docstrings.build(data, scenario, seed=1)
    # Assert: 400 rows each; each kind within one row of its natural share of 400 (largest remainder), and of its
    # share of the 80 test rows, so the within-package skew survives the cap and every kind is scored
    for spec, (tr, te) in zip(scenario.institutions, pool.parts):
        natural = df.loc[df["package"] == spec.name, "kind"].value_counts().reindex(KINDS).to_numpy()
        share = natural / natural.sum()
        kept, tested = np.bincount(pool.y[np.concatenate([tr, te])], minlength=4), np.bincount(pool.y[te], minlength=4)
        assert (len(tr), len(te)) == (320, 80)
        assert np.abs(kept - share * 400).max() < 1
        assert np.abs(tested - kept / 400 * 80).max() < 1 and tested.min() >= 1


def test_kind_task_spreads_over_any_institutions_with_iid(corpus_dir):
    # Execute: the default scenario's kind of names, rows spread by iid
    data = docs(corpus_dir, task="kind", partition="iid")
    check_data(data, sites("a", "b", "c"))
    pool = docstrings.build(data, sites("a", "b", "c"), seed=0, smoke=True)
    # Assert: the same four labels everywhere
    assert pool.num_classes == 4 and all(set(pool.y[tr]) == {0, 1, 2, 3} for tr, _ in pool.parts)


# --- data=text ----------------------------------------------------------------------------------

WORDS = {"bio": "protein cell gene enzyme", "astro": "galaxy star orbit redshift"}


def write_texts(tmp_path, rows_per_site=12, suffix=".csv", **columns) -> Path:
    """A small text file: sites s0 (bio), s1 (astro), s2 (both); labels by topic, a train/test column."""
    rows = []
    for site, topics in (("s0", ["bio", "astro"]), ("s1", ["astro", "bio"]), ("s2", ["bio", "astro"])):
        for i in range(rows_per_site):
            topic = topics[i % 2]
            rows.append({"text": f"{WORDS[topic]} number {i}", "label": topic, "institution": site,
                         "split": "test" if i % 4 == 3 else "train"})
    df = pd.DataFrame(rows)
    for col, values in columns.items():
        df[col] = values
    path = tmp_path / f"texts{suffix}"
    df.to_parquet(path) if suffix == ".parquet" else df.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_text_file_natural_split_gives_token_id_shards(tmp_path, tokenizer, suffix):
    path = write_texts(tmp_path, suffix=suffix)
    data = defaults("text") | {"path": str(path), "split_column": "split", "max_length": 8}
    fed = build_federation(data, sites("s0", "s1", "s2"), seed=0, model=MINILM)
    assert fed.input_shape == (8,) and fed.num_classes == 2
    for shard in fed.shards:
        assert (shard.num_train + len(shard.y_val), len(shard.y_test)) == (9, 3)  # the split column, not test_fraction
        assert shard.x_train.dtype == np.int64
    first = tokenizer("protein cell gene enzyme number 0", padding="max_length", max_length=8, truncation=True)
    assert list(fed.shards[0].x_train[0]) == first["input_ids"] and fed.shards[0].y_train[0] == 1  # astro=0, bio=1


def test_text_file_iid_caps_rows_per_institution(tmp_path):
    path = write_texts(tmp_path, rows_per_site=40)
    data = defaults("text") | {"path": str(path), "partition": "iid", "institution_column": None,
                               "max_rows_per_institution": 20}
    fed = build_federation(data, sites("x", "y"), seed=3, model=MINILM)
    assert [s.num_train + len(s.y_val) + len(s.y_test) for s in fed.shards] == [20, 20]
    assert all(len(np.unique(s.y_train)) == 2 for s in fed.shards)


# --- Bad input: one line naming the key, before anything trains -----------------------------------

def test_text_needs_a_transformer_model(tmp_path):
    data = defaults("text") | {"path": str(write_texts(tmp_path))}
    for model in (None, {"_target_": "sim.core.models.mlp", "hidden": [8]}):
        with pytest.raises(ConfigError, match=r"^model: data=text holds text; use a transformer model: model=minilm"):
            build_federation(data, sites("s0", "s1", "s2"), seed=0, model=model)


def test_text_refuses_feature_skew(tmp_path):
    data = defaults("text") | {"path": str(write_texts(tmp_path))}
    with pytest.raises(ConfigError, match=r"feature_skew: 's0' of scenario=\w+ asks for feature_skew 0.2.*token ids.*"
                                          r"data.institution_column=COLUMN"):
        check_data(data, sites("s0", "s1", "s2", feature_skew=0.2))


@pytest.mark.parametrize("change, key, message", [
    ({"text_column": "body"}, "data.text_column", "no column 'body'"),
    ({"label_column": "topic"}, "data.label_column", "no column 'topic'"),
    ({"institution_column": "site"}, "data.institution_column", "no column 'site'"),
    ({"institution_column": "label"}, "data.institution_column", "names no institution of the scenario"),
    ({"institution_column": None}, "data.institution_column", "partition natural needs the column"),
    ({"max_length": 1}, "data.max_length", "must be a whole number in"),
])
def test_text_bad_columns_and_keys(tmp_path, change, key, message):
    data = defaults("text") | {"path": str(write_texts(tmp_path))} | change
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*{re.escape(message)}"):
        check_data(data, sites("s0", "s1", "s2"))


def test_text_column_all_empty_is_refused(tmp_path):
    data = defaults("text") | {"path": str(write_texts(tmp_path, text=[""] * 36))}
    with pytest.raises(ConfigError, match=r"^data.text_column: .*holds no text"):
        check_data(data, sites("s0", "s1", "s2"))


def test_a_text_column_of_numbers_is_refused(tmp_path):
    # Prepare: the text column holds integers (a misnamed column, say)
    data = defaults("text") | {"path": str(write_texts(tmp_path, text=list(range(36))))}
    # Execute / Assert: refused before tokenising numbers as if they were documents
    with pytest.raises(ConfigError, match=r"^data.text_column: column 'text' of .* holds numbers, not text \(e.g. 0\)"):
        check_data(data, sites("s0", "s1", "s2"))


def test_a_text_institution_of_one_class_is_warned_about_and_too_few_rows_refused(tmp_path, caplog):
    one_class = ["bio"] * 12 + ["astro", "bio"] * 12
    data = defaults("text") | {"path": str(write_texts(tmp_path, label=one_class))}
    with caplog.at_level(logging.WARNING, logger="collabsim"):
        check_data(data, sites("s0", "s1", "s2"))
    assert "1 institution holds a single class ('s0' only 'bio')" in caplog.text
    data = defaults("text") | {"path": str(write_texts(tmp_path, rows_per_site=4))}
    with pytest.raises(ConfigError, match=r"^scenario.institutions: institution 's0' gets 3 train and 1 test"):
        check_data(data, sites("s0", "s1", "s2"))
    data = defaults("text") | {"path": str(write_texts(tmp_path))}
    with pytest.raises(ConfigError, match=r"^data.institution_column: institution 'nobody' has no rows"):
        check_data(data, sites("s0", "nobody"))


@pytest.mark.parametrize("change, key, message", [
    ({"task": "authors"}, "data.task", "unknown task 'authors'"),
    ({"task": "subpackage", "partition": "iid"}, "data.partition", "partition must be natural"),
    ({"task": "discipline"}, "data.partition", "gives each institution one class"),
    ({"task": "subpackage", "min_class_rows": 100_000}, "data.min_class_rows", "every institution would hold a single class"),
])
def test_docstrings_bad_task_and_partition(corpus_dir, change, key, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*{re.escape(message)}"):
        check_data(docs(corpus_dir, **change), package_scenario())


def test_docstrings_subpackage_needs_institutions_named_after_packages(corpus_dir):
    with pytest.raises(ConfigError, match=r"^scenario.institutions\[1\].name: 'lab' of scenario=\w+ is no package.*"
                                          r"use scenario=docstrings"):
        check_data(docs(corpus_dir), sites("scipy", "lab"))


def test_docstrings_kind_over_packages_needs_institutions_named_after_packages(corpus_dir):
    with pytest.raises(ConfigError, match=r"^scenario.institutions\[1\].name: 'lab' of scenario=\w+ is no package; "
                                          r"task=kind with partition=natural needs .*use scenario=docstrings.*"
                                          r"or spread the rows over any institutions with data.partition=iid"):
        check_data(docs(corpus_dir, task="kind"), sites("scipy", "lab"))


def test_docstrings_kind_refuses_a_cap_that_leaves_a_kind_out_of_a_test_split(corpus_dir):
    # Prepare: 30 rows of scikit-image keep 1 of its 27 classes (27/550 of 30), and its share of 6 test rows is 0.2
    data = docs(corpus_dir, task="kind", max_rows_per_institution=30)
    # Execute / Assert: one line naming the institution, the kind and the fix; the shipped cap of 400 passes
    with pytest.raises(ConfigError, match=r"^data.max_rows_per_institution: capped at 30 rows, institution "
                                          r"'scikit-image' keeps 1 of its 27 'class' docstrings and none in its test "
                                          r"split, so it is never scored on that kind; raise "
                                          r"data.max_rows_per_institution \(or null for all rows\)$"):
        check_data(data, package_scenario(["scikit-image"]))
    check_data(docs(corpus_dir, task="kind"), package_scenario(["scikit-image"]))


SUBPACKAGE_SCHEMES = [("fedavg", []), ("pooled", []), ("fedprox", ["aggregator=median"]),
                      ("finetune", ["scheme.finetune_steps=0"])]


@pytest.mark.parametrize("scheme, extra", SUBPACKAGE_SCHEMES)
def test_subpackage_refuses_schemes_that_score_one_shared_head(corpus_dir, scheme, extra):
    # Prepare: eight disjoint label spaces; a scheme scored on one shared model (wrapped, or fine-tuning 0 steps)
    cfg = compose("config", ["data=docstrings", "data.task=subpackage", "model=minilm", f"scheme={scheme}", *extra,
                             f"data.cache_dir={corpus_dir[0]}"])
    how = " adapting nothing before scoring" if scheme == "finetune" else ""
    # Execute / Assert: one line naming the scheme and the ones that run
    with pytest.raises(ConfigError, match=rf"^scheme: data.task=subpackage gives each institution its own label "
                                          rf"space, and scheme={scheme}{how} trains one shared head over all of them; "
                                          r"use ditto, fedper, finetune, isolated or reptile, or data.task=kind for "
                                          r"one shared task$"):
        load_spec(cfg)


@pytest.mark.parametrize("overrides", [["scheme=isolated", "data.task=subpackage"], ["scheme=fedper", "data.task=subpackage"],
                                       ["scheme=ditto", "data.task=subpackage"], ["scheme=finetune", "data.task=subpackage"],
                                       ["scheme=fedavg"], ["scheme=pooled"]])
def test_subpackage_accepts_personal_schemes_and_kind_any(corpus_dir, overrides):
    # Execute: the whole pre-run check, reading the session's corpus
    spec = load_spec(compose("config", ["data=docstrings", "model=minilm", *overrides,
                                        f"data.cache_dir={corpus_dir[0]}"]))
    # Assert
    assert spec.scheme_name == overrides[0].split("=")[1]


def test_the_shipped_foundation_experiment_passes_the_compares_pre_run_check(corpus_dir):
    from sim.compare import check, scheme_configs

    # Prepare
    overrides = ["+experiment=foundation_docstrings", f"data.cache_dir={corpus_dir[0]}"]
    cfg = compose("compare", overrides)
    # Execute: every scheme of both parts through load_spec (a refused one raises)
    check(cfg, overrides)
    runs = scheme_configs(cfg, overrides)
    # Assert: the shared task with every kind of scheme, the multi-task part with personal ones only
    tasks = {key: (sub.data.task, sub.scenario.name) for key, sub in runs.items()}
    assert tasks["shared_task/fedavg"] == ("kind", "shared_task") and tasks["shared_task/pooled"][0] == "kind"
    assert tasks["multi_task/fedper"] == ("subpackage", "multi_task") and "multi_task/fedavg" not in runs
    assert cfg.seeds >= 5


def test_data_docstrings_brings_its_own_scenario_unless_one_is_named():
    # Execute: the data group alone, then with a scenario named on the command line
    picked = compose("config", ["data=docstrings", "model=minilm"])
    named = compose("config", ["data=docstrings", "model=minilm", "scenario=default"])
    # Assert: its eight packages by default; the user's choice wins, and its refusal names the scenario to use
    assert picked.scenario.name == "docstrings" and named.scenario.name == "default"
    with pytest.raises(ConfigError, match=r"'city_hospital' of scenario=default is no package.*use scenario=docstrings"):
        load_spec(named)


def test_a_size_exponent_keeps_the_order_of_the_packages_sizes_under_the_cap(corpus_dir):
    # Prepare: sizes in proportion to the square root of each package's rows, the largest at 280
    data = docs(corpus_dir, task="kind", max_rows_per_institution=280, size_exponent=0.5)
    # Execute
    fed = build_federation(data, package_scenario(), seed=0, model=MINILM)
    # Assert: scikit-image (550 rows) keeps 78, sympy (7,091) 280, and the order of sizes is the corpus's
    sizes = {s.name: s.num_train + len(s.y_val) + len(s.y_test) for s in fed.shards}
    corpus = docstrings.corpus(corpus_dir[0])["package"].value_counts()
    assert sizes["scikit-image"] == 78 and sizes["sympy"] == 280
    assert sorted(sizes, key=sizes.get) == sorted(sizes, key=lambda p: corpus[p])
    assert docstrings.sized([550, 7091], 280, None) == 280  # null: one cap for all, as before
    smoke = build_federation(data, package_scenario(), seed=0, smoke=True, model=MINILM)
    assert {s.num_train + len(s.y_val) + len(s.y_test) for s in smoke.shards} == {60}  # smoke: a ceiling, not scaled
