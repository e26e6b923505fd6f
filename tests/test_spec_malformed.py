"""A spec cannot harm its host: a table of malformed specs, each one rejected by
``dse validate`` and ``dse run`` (the CLI's main(), in-process) with exit code 2, one line
per problem naming the file and the field, no traceback, and nothing created on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dse.cli import main

STUDY = '[study]\nname = "s"\nseed = 0\nsampler = "random"\nn_trials = 4\n'
OBJ = '[[objectives]]\nmetric = "f1"\nref = 1.1\n[[objectives]]\nmetric = "f2"\nref = 1.1\n'
SPACE = ('[space.x]\n0 = { type = "float", low = 0.0, high = 1.0 }\n'
         '1 = { type = "float", low = 0.0, high = 1.0 }\n')
EVAL = '[[evaluators]]\nname = "zdt1"\noptions = { n_vars = 2 }\n'
RAY = "[ray]\nworkers = 2\n"
TRACK = "[tracking]\nenabled = false\n"
BASE = STUDY + OBJ + SPACE + EVAL + RAY + TRACK


def sub(old: str, new: str) -> str:
    """BASE with ``old`` (which must occur) replaced by ``new``."""
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def study(line: str) -> str:
    """BASE with one more line in [study] (or a replaced one, when the key is there)."""
    key = line.split("=")[0].strip()
    lines = [ln for ln in STUDY.splitlines() if ln.split("=")[0].strip() != key]
    return BASE.replace(STUDY, "\n".join([*lines, line]) + "\n", 1)


def name(value: str) -> str:
    return sub('name = "s"', f"name = {value}")


def param(leaf: str) -> str:
    """BASE with x.0 replaced by ``leaf`` (an inline table or a value)."""
    return sub('0 = { type = "float", low = 0.0, high = 1.0 }', f"0 = {leaf}")


def extra(text: str) -> str:
    return BASE + text


# (id, spec text or bytes, a fragment every reported problem's line set must contain)
CASES: list[tuple[str, str | bytes, str]] = [
    # ---- the file itself
    ("toml_unclosed_table", "[study\nname = 1\n", "invalid TOML"),
    ("toml_bad_string", BASE + 'x = "abc\n', "invalid TOML"),
    ("toml_duplicate_key", sub('seed = 0\n', 'seed = 0\nseed = 1\n'), "invalid TOML"),
    ("toml_bad_escape", name('"a\\qb"'), "invalid TOML"),
    ("toml_nul_byte", BASE + "x = 1\0\n", "invalid TOML"),
    ("toml_latin1", BASE.replace('"s"', '"caf\xe9"').encode("latin-1"), "UTF-8"),
    ("toml_utf16", BASE.encode("utf-16"), "UTF-8"),
    ("toml_deep_arrays", BASE + "x = " + "[" * 2999 + "]" * 2999 + "\n", "invalid TOML"),
    ("toml_deep_inline_tables", BASE + "x = " + "{a = " * 2999 + "1" + "}" * 2999 + "\n",
     "invalid TOML"),
    ("space_deep_tables", BASE.replace(SPACE, "[space." + ".".join(["a"] * 2999)
                                       + "]\nb = { choices = [1] }\n"), "space"),
    ("empty_file", "", "study"),
    ("not_a_spec", "hello = 1\n", "hello"),
    # ---- study.name: a plain name, never a path or an option
    ("name_dot", name('"."'), "study.name"),
    ("name_dotdot", name('".."'), "study.name"),
    ("name_leading_dot", name('".hidden"'), "study.name"),
    ("name_double_dot_inside", name('"a..b"'), "study.name"),
    ("name_option_help", name('"--help"'), "study.name"),
    ("name_leading_dash", name('"-x"'), "study.name"),
    ("name_slash", name('"a/b"'), "study.name"),
    ("name_parent_path", name('"../escape"'), "study.name"),
    ("name_absolute", name('"/tmp/x"'), "study.name"),
    ("name_backslash", name('"a\\\\b"'), "study.name"),
    ("name_space", name('"a b"'), "study.name"),
    ("name_empty", name('""'), "study.name"),
    ("name_newline", name('"a\\nb"'), "study.name"),
    ("name_300_chars", name('"' + "a" * 300 + '"'), "study.name"),
    ("name_65_chars", name('"' + "a" * 65 + '"'), "study.name"),
    ("name_non_ascii", name('"café"'), "study.name"),
    ("name_tilde", name('"~root"'), "study.name"),
    ("name_star", name('"*"'), "study.name"),
    ("name_int", name("3"), "study.name"),
    ("name_bool", name("true"), "study.name"),
    ("name_array", name('["s"]'), "study.name"),
    ("name_missing", sub('name = "s"\n', ""), "study.name"),
    # ---- study numbers
    ("seed_negative", study("seed = -1"), "study.seed"),
    ("seed_float", study("seed = 1.5"), "study.seed"),
    ("seed_2_32", study("seed = 4294967296"), "study.seed"),
    ("seed_2_63", study("seed = 9223372036854775807"), "study.seed"),
    ("seed_string", study('seed = "0"'), "study.seed"),
    ("seed_bool", study("seed = true"), "study.seed"),
    ("n_trials_zero", study("n_trials = 0"), "study.n_trials"),
    ("n_trials_negative", study("n_trials = -3"), "study.n_trials"),
    ("n_trials_2_63", study("n_trials = 9223372036854775807"), "study.n_trials"),
    ("n_trials_float", study("n_trials = 10.0"), "study.n_trials"),
    ("n_trials_string", study('n_trials = "10"'), "study.n_trials"),
    ("timeout_zero", study("timeout_s = 0"), "study.timeout_s"),
    ("timeout_negative", study("timeout_s = -5"), "study.timeout_s"),
    ("timeout_nan", study("timeout_s = nan"), "study.timeout_s"),
    ("timeout_inf", study("timeout_s = inf"), "study.timeout_s"),
    ("timeout_string", study('timeout_s = "1h"'), "study.timeout_s"),
    ("max_failed_negative", study("max_failed = -1"), "study.max_failed"),
    ("max_failed_float", study("max_failed = 2.5"), "study.max_failed"),
    ("max_failed_2_63", study("max_failed = 9223372036854775807"), "study.max_failed"),
    ("study_unknown_key", study("n_trail = 5"), "study.n_trail"),
    ("study_not_a_table", BASE.replace(STUDY, 'study = 5\n'), "study"),
    # ---- sampler and its options
    ("sampler_unknown", study('sampler = "cmaes"'), "study.sampler"),
    ("sampler_int", study("sampler = 1"), "study.sampler"),
    ("sampler_options_unknown", study('sampler = "nsga2"\n[study.sampler_options]\npopsize = 4'),
     "study.sampler_options.popsize"),
    ("sampler_options_population_1",
     study('sampler = "nsga2"\n[study.sampler_options]\npopulation_size = 1'), "study.sampler_options"),
    ("sampler_options_population_str",
     study('sampler = "nsga2"\n[study.sampler_options]\npopulation_size = "x"'), "study.sampler_options"),
    ("sampler_options_crossover_str",
     study('sampler = "nsga2"\n[study.sampler_options]\ncrossover = "nope"'), "study.sampler_options"),
    ("sampler_options_mutation_prob",
     study('sampler = "nsga2"\n[study.sampler_options]\nmutation_prob = 2.0'), "study.sampler_options"),
    ("sampler_options_table",
     study('sampler = "nsga2"\n[study.sampler_options]\npopulation_size = { a = 1 }'), "study.sampler_options"),
    ("sampler_options_qmc_type", study('sampler = "qmc"\n[study.sampler_options]\nqmc_type = "bad"'),
     "study.sampler_options"),
    ("sampler_options_qmc_independent",
     study('sampler = "qmc"\n[study.sampler_options]\nindependent_sampler = "random"'),
     "study.sampler_options"),
    ("sampler_options_gp_object", study('sampler = "gp"\n[study.sampler_options]\nindependent_sampler = "qmc"'),
     "study.sampler_options.independent_sampler"),
    ("sampler_options_not_table", study('sampler_options = 3'), "study.sampler_options"),
    # ---- storage: a database URL or a journal path
    ("storage_int", study("storage = 5"), "study.storage"),
    ("storage_empty", study('storage = ""'), "study.storage"),
    ("storage_word", study('storage = "notaurl"'), "study.storage"),
    ("storage_unknown_scheme", study('storage = "foo://bar"'), "study.storage"),
    ("storage_txt_path", study('storage = "study.txt"'), "study.storage"),
    ("storage_bad_sqlite", study('storage = "sqlite:/relative"'), "study.storage"),
    # ---- objectives
    ("objectives_missing", BASE.replace(OBJ, ""), "objectives"),
    ("objectives_empty", BASE.replace(OBJ, "objectives = []\n"), "objectives"),
    ("objectives_not_tables", BASE.replace(OBJ, "objectives = [1, 2]\n"), "objectives"),
    ("objective_metric_missing", sub('metric = "f1"\n', ""), "objectives[0]"),
    ("objective_metric_int", sub('metric = "f1"', "metric = 1"), "objectives[0].metric"),
    ("objective_direction", sub('metric = "f1"\n', 'metric = "f1"\ndirection = "down"\n'),
     "objectives[0].direction"),
    ("objective_duplicate", sub('metric = "f2"', 'metric = "f1"'), "objectives[1].metric"),
    ("objective_ref_string", sub("ref = 1.1\n", 'ref = "big"\n'), "objectives[0].ref"),
    ("objective_ref_nan", sub("ref = 1.1\n", "ref = nan\n"), "objectives[0].ref"),
    ("objective_ref_inf", sub("ref = 1.1\n", "ref = inf\n"), "objectives[0].ref"),
    ("objective_unknown_key", sub("ref = 1.1\n", "ref = 1.1\nweight = 2\n"), "objectives[0].weight"),
    ("objective_unknown_metric", sub('metric = "f2"', 'metric = "latency_s"'), "latency_s"),
    # ---- constraints
    ("constraint_op", extra('[[constraints]]\nmetric = "f1"\nop = "<"\nbound = 1.0\n'), "constraints[0].op"),
    ("constraint_no_bound", extra('[[constraints]]\nmetric = "f1"\nop = "<="\n'), "constraints[0].bound"),
    ("constraint_bound_nan", extra('[[constraints]]\nmetric = "f1"\nop = "<="\nbound = nan\n'),
     "constraints[0].bound"),
    ("constraint_bound_string", extra('[[constraints]]\nmetric = "f1"\nop = "<="\nbound = "1"\n'),
     "constraints[0].bound"),
    ("constraint_no_metric", extra('[[constraints]]\nop = "<="\nbound = 1\n'), "constraints[0].metric"),
    ("constraint_unknown_key", extra('[[constraints]]\nmetric = "f1"\nop = "<="\nbound = 1\nsoft = true\n'),
     "constraints[0].soft"),
    ("constraint_unknown_metric", extra('[[constraints]]\nmetric = "area_mm2"\nop = "<="\nbound = 1\n'),
     "area_mm2"),
    ("constraints_not_tables", extra("constraints = 3\n"), "constraints"),
    # ---- the space
    ("space_missing", BASE.replace(SPACE, ""), "space"),
    ("space_not_table", BASE.replace(SPACE, "space = 1\n"), "space"),
    ("space_leaf_int", param("5"), "space.x.0"),
    ("space_leaf_empty", param("{}"), "space.x.0"),
    ("space_type_double", param('{ type = "double", low = 0, high = 1 }'), "space.x.0.type"),
    ("space_low_gt_high", param('{ type = "float", low = 1.0, high = 0.0 }'), "space.x.0.high"),
    ("space_log_low_zero", param('{ type = "float", low = 0.0, high = 1.0, log = true }'), "space.x.0.low"),
    ("space_log_string", param('{ type = "float", low = 0.1, high = 1.0, log = "yes" }'), "space.x.0.log"),
    ("space_low_nan", param('{ type = "float", low = nan, high = 1.0 }'), "space.x.0.low"),
    ("space_high_inf", param('{ type = "float", low = 0.0, high = inf }'), "space.x.0.high"),
    ("space_low_missing", param('{ type = "float", high = 1.0 }'), "space.x.0.low"),
    ("space_step_zero", param('{ type = "float", low = 0.0, high = 1.0, step = 0.0 }'), "space.x.0.step"),
    ("space_step_negative", param('{ type = "float", low = 0.0, high = 1.0, step = -0.1 }'), "space.x.0.step"),
    ("space_int_float_low", param('{ type = "int", low = 0.5, high = 4 }'), "space.x.0.low"),
    ("space_int_step_divides", param('{ type = "int", low = 0, high = 10, step = 3 }'), "space.x.0.step"),
    ("space_int_log_step", param('{ type = "int", low = 1, high = 9, step = 2, log = true }'), "space.x.0.step"),
    ("space_choices_empty", param("{ choices = [] }"), "space.x.0.choices"),
    ("space_choices_duplicate", param('{ choices = ["a", "a"] }'), "space.x.0.choices"),
    ("space_choices_int_float", param("{ choices = [1, 1.0] }"), "space.x.0.choices"),
    ("space_choices_bool_int", param("{ choices = [true, 1] }"), "space.x.0.choices"),
    ("space_choices_false_zero", param("{ choices = [0.0, false] }"), "space.x.0.choices"),
    ("space_choices_nan", param("{ choices = [0.5, nan] }"), "space.x.0.choices"),
    ("space_choices_inf", param("{ choices = [0.5, inf] }"), "space.x.0.choices"),
    ("space_choices_nested", param("{ choices = [[1], [2]] }"), "space.x.0.choices"),
    ("space_choices_table", param("{ choices = [{ a = 1 }] }"), "space.x.0.choices"),
    ("space_choices_string", param('{ choices = "ab" }'), "space.x.0.choices"),
    ("space_two_kinds", param('{ choices = [0.5], type = "float" }'), "space.x.0"),
    ("space_unknown_leaf_key", param("{ choices = [0.5], lo = 1 }"), "space.x.0.lo"),
    ("space_value_array", param("{ value = [1, 2] }"), "space.x.0.value"),
    ("space_value_nan", param("{ value = nan }"), "space.x.0.value"),
    ("space_value_with_low", param("{ value = 0.5, low = 0 }"), "space.x.0.low"),
    ("space_bad_key", BASE.replace(SPACE, SPACE + '"a b" = { choices = [1] }\n'), "space.x.a b"),
    ("space_unread_param", BASE.replace(SPACE, SPACE + "2 = { choices = [1] }\n"), "space.x.2"),
    ("space_when_unknown", BASE.replace(SPACE, SPACE.replace(
        "1 = { type", "1 = { when = { \"x.9\" = [1] }, type")), "space.x.1.when"),
    ("space_when_float_target", BASE.replace(SPACE, SPACE.replace(
        "1 = { type", "1 = { when = { \"x.0\" = [0.5] }, type")), "space.x.1.when"),
    ("space_when_not_list", BASE.replace(SPACE, SPACE.replace(
        '0 = { type = "float", low = 0.0, high = 1.0 }', '0 = { choices = [0.5, 0.25] }').replace(
        "1 = { type", '1 = { when = { "x.0" = 0.5 }, type')), "space.x.1.when"),
    ("space_when_bad_value", BASE.replace(SPACE, SPACE.replace(
        '0 = { type = "float", low = 0.0, high = 1.0 }', '0 = { choices = [0.5, 0.25] }').replace(
        "1 = { type", '1 = { when = { "x.0" = [0.75] }, type')), "space.x.1.when"),
    ("space_when_self", BASE.replace(SPACE, SPACE.replace(
        "1 = { type", '1 = { when = { "x.1" = [1] }, type')), "space.x.1.when"),
    ("space_when_string", BASE.replace(SPACE, SPACE.replace(
        "1 = { type", '1 = { when = "x.0", type')), "space.x.1.when"),
    # ---- baselines
    ("enqueue_unknown", extra('[[study.enqueue]]\n"x.9" = 0.5\n'), "study.enqueue[0].x.9"),
    ("enqueue_out_of_range", extra('[[study.enqueue]]\n"x.0" = 2.0\n'), "study.enqueue[0].x.0"),
    ("enqueue_string", extra('[[study.enqueue]]\n"x.0" = "a"\n'), "study.enqueue[0].x.0"),
    ("enqueue_nan", extra('[[study.enqueue]]\n"x.0" = nan\n'), "study.enqueue[0].x.0"),
    ("enqueue_not_tables", study("enqueue = [1]"), "study.enqueue"),
    # ---- evaluators
    ("evaluators_missing", BASE.replace(EVAL, ""), "evaluators"),
    ("evaluators_not_tables", BASE.replace(EVAL, "evaluators = 1\n"), "evaluators"),
    ("evaluator_unknown", sub('name = "zdt1"', 'name = "nope"'), "evaluators[0].name"),
    ("evaluator_name_int", sub('name = "zdt1"', "name = 3"), "evaluators[0].name"),
    ("evaluator_missing_module", sub('name = "zdt1"', 'name = "no_such_pkg.mod:factory"'),
     "evaluators[0].name"),
    ("evaluator_option_small", sub("n_vars = 2", "n_vars = 1"), "evaluators[0].options"),
    ("evaluator_option_unknown", sub("n_vars = 2", "n_vars = 2, speed = 1"), "evaluators[0].options"),
    ("evaluator_option_type", sub("n_vars = 2", 'n_vars = "two"'), "evaluators[0].options"),
    ("evaluator_options_not_table", sub("options = { n_vars = 2 }", "options = 2"), "evaluators[0].options"),
    ("evaluator_unknown_key", sub("options = { n_vars = 2 }", "options = { n_vars = 2 }\nretries = 3"),
     "evaluators[0].retries"),
    ("resources_negative", sub("options = { n_vars = 2 }", "options = { n_vars = 2 }\nresources = { num_cpus = -1 }"),
     "evaluators[0].resources.num_cpus"),
    ("resources_nan", sub("options = { n_vars = 2 }", "options = { n_vars = 2 }\nresources = { num_gpus = nan }"),
     "evaluators[0].resources.num_gpus"),
    ("resources_unknown", sub("options = { n_vars = 2 }", "options = { n_vars = 2 }\nresources = { cpus = 1 }"),
     "evaluators[0].resources.cpus"),
    ("resources_not_table", sub("options = { n_vars = 2 }", "options = { n_vars = 2 }\nresources = 4"),
     "evaluators[0].resources"),
    # ---- ray
    ("workers_zero", sub("workers = 2", "workers = 0"), "ray.workers"),
    ("workers_100000", sub("workers = 2", "workers = 100000"), "ray.workers"),
    ("workers_float", sub("workers = 2", "workers = 2.5"), "ray.workers"),
    ("address_int", sub("workers = 2", "workers = 2\naddress = 1"), "ray.address"),
    ("address_empty", sub("workers = 2", 'workers = 2\naddress = ""'), "ray.address"),
    ("ray_unknown_key", sub("workers = 2", "workers = 2\ngpus = 1"), "ray.gpus"),
    ("ray_not_table", BASE.replace(RAY, "ray = 1\n"), "ray"),
    # ---- tracking
    ("tracking_enabled_string", sub("enabled = false", 'enabled = "yes"'), "tracking.enabled"),
    ("tracking_child_runs", sub("enabled = false", 'enabled = false\nchild_runs = "some"'),
     "tracking.child_runs"),
    ("tracking_artifact_every", sub("enabled = false", "enabled = false\nartifact_every = 0"),
     "tracking.artifact_every"),
    ("tracking_uri_int", sub("enabled = false", "enabled = false\nuri = 5"), "tracking.uri"),
    ("tracking_unknown_key", sub("enabled = false", "enabled = false\nexperiment = 1"), "tracking.experiment"),
    # ---- sections
    ("unknown_section", extra("[trackng]\nenabled = true\n"), "trackng"),
    ("unknown_top_key", extra("verbose = true\n"), "verbose"),
]


def test_table_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


def test_base_spec_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """The table tests one fault at a time: the spec they start from is accepted."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.toml").write_text(BASE)
    assert main(["validate", "ok.toml"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("text", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_spec(text: str | bytes, field: str, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing may land in the working directory either
    path = work / "bad.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    for argv in (["validate", str(path)], ["run", str(path), "--dir", str(tmp_path / "studies")]):
        rc = main(argv)
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert rc == 2, (argv, rc, out.err[-2000:])
        assert "Traceback" not in out.err and out.out == ""
        assert 1 <= len(lines) <= 5, lines  # one per problem: an empty file misses 4 sections
        assert all(ln.startswith(f"{path}: ") and ": " in ln[len(str(path)) + 2:] for ln in lines), lines
        if len(lines) > 1:  # several lines: each names its own field
            assert len({ln[len(str(path)) + 2:].split(": ")[0] for ln in lines}) == len(lines), lines
        assert any(field in ln for ln in lines), lines
    assert sorted(os.listdir(work)) == ["bad.toml"] and sorted(os.listdir(tmp_path)) == ["work"]


@pytest.mark.parametrize("bad", ["..", ".", "../x", "a/b", "-", "a..b", "x" * 65])
def test_study_names_on_the_command_line_are_plain(
    bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "studies"
    root.mkdir()
    for cmd in (["status", bad], ["resume", bad], ["export", bad, "--out", str(tmp_path / "t.csv")],
                ["pareto", bad], ["sync", bad]):
        assert main([*cmd, "--dir", str(root)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "study: expected a plain name" in err[0], err
    assert os.listdir(root) == [] and sorted(os.listdir(tmp_path)) == ["studies"]
