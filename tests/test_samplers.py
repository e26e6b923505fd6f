"""The default sampler (dse/samplers.py): the choice, a spec without a sampler, a study
that records it and a resume that keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from dse import api
from dse.cli import main
from dse.driver import Driver
from dse.plugins.benchmarks import study_spec
from dse.samplers import (
    GP_MAX_TRIALS,
    PAREGO_MAX_TRIALS,
    SAMPLER_ATTR,
    default_sampler,
    describe,
    warmup_trials,
)
from dse.spec import SAMPLER_CLASSES, Spec, SpecError, parse_spec


def test_default_sampler_choice() -> None:
    mv, grouped = {"multivariate": True}, {"multivariate": True, "group": True}
    for n_trials, pop in ((1, 10), (50, 10), (100, 10), (101, 10), (200, 10), (500, 10),
                          (1000, 20), (2000, 40), (10_000, 50)):
        small = n_trials <= GP_MAX_TRIALS
        assert default_sampler(1, n_trials) == ("tpe", mv)
        assert default_sampler(1, n_trials, continuous=True) == ("tpe", mv)
        for n_obj in (1, 2, 3):  # conditional spaces: grouped multivariate TPE
            assert default_sampler(n_obj, n_trials, conditional=True) == ("tpe", grouped)
            assert default_sampler(n_obj, n_trials, continuous=True, conditional=True) == ("tpe", grouped)
        parego = ("parego", {"n_startup_trials": 10})
        for n_obj in (2, 3, 5):  # spaces with choices: ParEGO, NSGA-II for large budgets
            assert default_sampler(n_obj, n_trials) == (
                parego if n_trials <= PAREGO_MAX_TRIALS else ("nsga2", {"population_size": pop}))
        # continuous: GP then ParEGO for 2 objectives on small budgets, else independent TPE
        assert default_sampler(2, n_trials, continuous=True) == (
            ("gp", {}) if small else parego if n_trials <= PAREGO_MAX_TRIALS else ("tpe", {}))
        assert default_sampler(3, n_trials, continuous=True) == ("tpe", {})
        for n_obj in (1, 2, 3):
            for cont in (False, True):
                name, opts = default_sampler(n_obj, n_trials, continuous=cont)
                SAMPLER_CLASSES[name](seed=0, **opts)  # Optuna takes the options
    for bad, msg in [((0, 10), "n_objectives: expected an integer >= 1, got 0"),
                     ((2, 0), "n_trials: expected an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=msg):
            default_sampler(*bad)
    # ParEGO's warm-up: 2 (d + 1) random trials, at least Optuna's 10
    assert [warmup_trials(d) for d in (0, 4, 5, 8, 12)] == [10, 10, 12, 18, 26]
    assert default_sampler(3, 200, n_params=12) == ("parego", {"n_startup_trials": 26})
    assert default_sampler(2, 150, continuous=True, n_params=4) == ("parego", {"n_startup_trials": 10})
    assert default_sampler(3, 500, n_params=12) == ("nsga2", {"population_size": 10})
    assert default_sampler(3, 200, continuous=True, n_params=12) == ("tpe", {})
    assert describe("tpe", grouped) == "tpe (group=True, multivariate=True)"
    assert describe("random", {}) == "random"


def test_spec_without_sampler_gets_the_default() -> None:
    s = parse_spec(study_spec("s", n_trials=200, sampler=None))  # 2 objectives, 2 floats
    assert s.sampler_auto and (s.sampler, s.sampler_options) == ("parego", {"n_startup_trials": 10})
    s.choose_sampler(60)  # the run's budget decides
    assert (s.sampler, s.sampler_options) == ("gp", {})
    cat = study_spec("c", n_trials=60, sampler=None).replace(
        '1 = { type = "float", low = 0.0, high = 1.0 }', "1 = { choices = [0.0, 0.5, 1.0] }")
    assert (parse_spec(cat).sampler, parse_spec(cat).sampler_options) == (
        "parego", {"n_startup_trials": 10})  # a space with choices
    cat_big = parse_spec(cat.replace("n_trials = 60", "n_trials = 1000"))
    assert (cat_big.sampler, cat_big.sampler_options) == ("nsga2", {"population_size": 20})
    named = parse_spec(study_spec("s", n_trials=200, sampler="nsga2",
                                  sampler_options={"population_size": 8}))
    assert not named.sampler_auto and named.sampler == "nsga2"
    named.choose_sampler(60)  # an explicit sampler always wins
    assert (named.sampler, named.sampler_options) == ("nsga2", {"population_size": 8})
    # options without a sampler: on top of the default, checked against it, kept as chosen
    given = parse_spec(study_spec("s", n_trials=200, sampler=None,
                                  sampler_options={"n_startup_trials": 5}))
    assert given.sampler == "parego" and given.sampler_options == {"n_startup_trials": 5}
    given.choose_sampler(60)
    assert given.sampler == "parego" and given.sampler_options["n_startup_trials"] == 5
    with pytest.raises(SpecError, match="study.sampler_options.nope: unknown option of the parego sampler"):
        parse_spec(study_spec("s", n_trials=200, sampler=None, sampler_options={"nope": 1}))


def test_study_without_sampler_records_and_keeps_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    made: list[optuna.samplers.BaseSampler] = []  # every sampler a spec builds, in order
    make = Spec.make_sampler

    def recording(self: Spec, n_trials_in_study: int = 0) -> optuna.samplers.BaseSampler:
        made.append(make(self, n_trials_in_study))
        return made[-1]

    monkeypatch.setattr(Spec, "make_sampler", recording)
    text = study_spec("auto", n_trials=10, sampler=None, n_vars=2, tracking={"enabled": False})
    text = text.replace("[ray]\n", '[ray]\naddress = "inline"\n', 1).replace(
        '1 = { type = "float", low = 0.0, high = 1.0 }', "1 = { choices = [0.0, 0.5, 1.0] }")
    root = tmp_path / "studies"
    res = api.run(text, root=root, progress=False)
    name, opts = "parego", {"n_startup_trials": 10}  # a space with choices (its 10 trials random)
    assert res.study.user_attrs[SAMPLER_ATTR] == {"name": name, "options": opts, "auto": True}
    assert res.spec.sampler == name and res.spec.sampler_options == opts
    # the record wins over a fresh choice: make it say "random", resume with more trials
    res.study.set_user_attr(SAMPLER_ATTR, {"name": "random", "options": {}, "auto": True})
    driver = Driver(parse_spec(text), root, n_trials=20, progress=False)
    driver.run()
    assert isinstance(made[-1], optuna.samplers.RandomSampler)  # the study's sampler
    assert driver.spec.sampler == "random"
    loaded = api.load("auto", root)
    assert loaded.spec.sampler == "random"
    capsys.readouterr()
    assert main(["status", "auto", "--dir", str(root)]) == 0
    assert "sampler random (the default for this study, docs/driver.md)" in capsys.readouterr().out
    assert main(["status", "auto", "--dir", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == {"name": "random", "options": {}, "auto": True}
    done = [t for t in loaded.study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 20
    # a study that names its sampler uses and records it, whatever the record said
    named = text.replace("n_trials = 10\n", 'n_trials = 10\nsampler = "nsga2"\n', 1)
    driver = Driver(parse_spec(named), root, n_trials=24, progress=False, allow_spec_change=True)
    driver.run()
    assert isinstance(made[-1], optuna.samplers.NSGAIISampler)
    stored = api.load("auto", root).study.user_attrs[SAMPLER_ATTR]
    assert stored == {"name": "nsga2", "options": {}, "auto": False}


def test_study_without_record_keeps_the_old_default(tmp_path: Path) -> None:
    """A study begun before the choice was recorded continues with NSGA-II (the old
    default for several objectives), and gets the record."""
    text = study_spec("old", n_trials=4, sampler=None, n_vars=2, tracking={"enabled": False})
    text = text.replace("[ray]\n", '[ray]\naddress = "inline"\n', 1).replace(
        '1 = { type = "float", low = 0.0, high = 1.0 }', "1 = { choices = [0.0, 0.5, 1.0] }")
    root = tmp_path / "studies"
    res = api.run(text, root=root, progress=False)
    assert res.study.user_attrs[SAMPLER_ATTR]["name"] == "parego"
    res.study.set_user_attr(SAMPLER_ATTR, None)  # as a study from before the record
    assert api.load("old", root).spec.sampler == "nsga2"
    res2 = api.run(text, root=root, n_trials=6, progress=False)
    assert res2.study.user_attrs[SAMPLER_ATTR] == {"name": "nsga2", "options": {}, "auto": True}


def test_ga_generations_counted_incrementally_equal_optunas() -> None:
    """dse's NSGA-II (generations counted incrementally) and Optuna's, driven the same way
    with trials told out of order (an older trial COMPLETE after newer ones, FAILs too):
    the same generation on every trial, the same parameters."""
    from dse.samplers import NSGAIISampler

    studies = [optuna.create_study(directions=["minimize", "minimize"], sampler=cls(seed=1, population_size=4))
               for cls in (optuna.samplers.NSGAIISampler, NSGAIISampler)]
    def tell(study: optuna.Study, t: optuna.Trial, fail: bool) -> None:
        x = t.params["x"]
        study.tell(t, state=optuna.trial.TrialState.FAIL) if fail else study.tell(t, [x, 1.0 - x**0.5])

    for round_ in range(12):
        for study in studies:
            trials = [study.ask() for _ in range(3)]
            for t in trials:
                t.suggest_float("x", 0.0, 1.0)
            tell(study, trials[2], False)  # the newest COMPLETE first ...
            late = study.ask()
            late.suggest_float("x", 0.0, 1.0)  # (its generation counts trials[2])
            for k in (0, 1):  # ... then older ones: the next count starts again
                tell(study, trials[k], (round_ + k) % 5 == 0)
            tell(study, late, False)
    key = "NSGAIISampler:generation"  # the class name: dse's keeps Optuna's (existing studies)
    gens = [[t.system_attrs.get(key) for t in s.trials] for s in studies]
    assert gens[0] == gens[1] and max(g for g in gens[0] if g is not None) >= 4
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]


def test_ga_generation_count_sees_older_trials_completing_late() -> None:
    """get_trial_generation after every tell, trials of known generations told in a
    shuffled order: always Optuna's rule (largest generation among COMPLETE trials, + 1
    once it holds population_size of them), also when an older trial turns COMPLETE after
    the count moved past it."""
    import random

    from dse.samplers import NSGAIISampler

    sampler = NSGAIISampler(seed=0, population_size=3)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    key = "NSGAIISampler:generation"
    rng = random.Random(0)
    gens = [0, 0, 0, 1, 1, 2, 1, 2, 2, 2, 3, 0, 3]
    trials = [study.ask() for _ in gens]
    for t, g in zip(trials, gens, strict=True):
        study._storage.set_trial_system_attr(t._trial_id, key, g)
    order = list(range(len(gens)))
    rng.shuffle(order)
    done: list[int] = []
    for i in order:
        study.tell(trials[i], [0.0, 0.0])
        done.append(gens[i])
        probe = study.ask()
        top = max([0, *done])
        want = top + 1 if done.count(top) >= 3 else top
        assert sampler.get_trial_generation(study, study._storage.get_trial(probe._trial_id)) == want
        study.tell(probe, state=optuna.trial.TrialState.FAIL)
