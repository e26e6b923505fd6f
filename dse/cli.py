"""The ``dse`` command line: run, resume, status, pareto, export, sync, ui, validate.

Exit codes: 0 success (or ``timeout_s`` reached); 1 the search or a command failed at run
time, or a run ended short of ``n_trials`` (``max_failed``); 2 a bad spec or bad arguments
(nothing is created); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM) (``dse resume``
continues); 141 the reader of the output went away (``dse pareto NAME | head``), silently,
like other Unix tools killed by SIGPIPE. See docs/cli.md.

Output: dse's own lines (results, progress, warnings) only; the libraries' INFO lines
and warnings (Ray, MLflow, Optuna, Python warnings) appear with ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

# dse's own modules are imported inside the functions: importing them (optuna) takes ~1 s,
# and a Ctrl-C then would print a traceback before main() can catch it


@functools.cache  # built once per process (argparse costs ~20 ms, mostly gettext look-ups)
def _parser() -> argparse.ArgumentParser:
    from dse.driver import DEFAULT_DIR

    p = argparse.ArgumentParser(prog="dse", description="Distributed design-space exploration.")
    sub = p.add_subparsers(dest="command", required=True)

    def storage(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--storage", metavar="URL",
                        help="the study's storage: postgresql://user@host/db, sqlite:///x.db or "
                             "a .journal path (default: the spec's, else <dir>/<study>/optuna.journal); "
                             "the spec is read from the storage, so no spec file is needed")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dir", default=str(DEFAULT_DIR), help="where studies live (default ./dse-studies)")
        storage(sp)
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' INFO lines and warnings (Ray, MLflow, ...)")

    def tracking_uri(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tracking-uri", "--uri", dest="tracking_uri", metavar="URI",
                        help="MLflow tracking URI (default: the spec's [tracking] uri, else "
                             "$MLFLOW_TRACKING_URI, else the study's mlflow.db)")

    def overrides(sp: argparse.ArgumentParser) -> None:
        common(sp)
        sp.add_argument("--n-trials", type=int, help="COMPLETE trials to reach (overrides the spec)")
        sp.add_argument("--workers", type=int, help="Ray actors per evaluator without its own workers (overrides [ray] workers)")
        sp.add_argument("--seed", type=int, help="sampler seed (overrides the spec)")
        sp.add_argument("--batch", type=int,
                        help="trials evaluated per call when every evaluator runs in the driver "
                             "process (default 1; PLENA vectorises them); part of a deterministic "
                             "study's recipe, as --workers")
        sp.add_argument("--address", help="Ray address: local (started only if an evaluator needs actors), "
                        "auto or ray://host:port")
        sp.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="same seed and workers -> same study whatever the timing (default: the "
                             "spec's [study] deterministic, true); --no-deterministic for throughput")
        sp.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        sp.add_argument("--allow-spec-change", action="store_true",
                        help="continue an existing study with a spec that differs from its stored one")
        tracking_uri(sp)
        sp.add_argument("--progress", choices=("auto", "bar", "log"), default="auto",
                        help="progress display (default: bar on a TTY, log lines otherwise)")

    sp = sub.add_parser("run", help="run a study from a spec (continues it if it exists)")
    sp.add_argument("spec", type=Path)
    overrides(sp)
    sp = sub.add_parser("resume", help="continue a study after a crash or Ctrl-C")
    sp.add_argument("study")
    overrides(sp)
    sp = sub.add_parser("status", help="trials by state, Pareto size, hypervolume")
    sp.add_argument("study")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    common(sp)
    sp = sub.add_parser("pareto", help="print the Pareto front (or write it with --out)")
    sp.add_argument("study")
    sp.add_argument("--out", type=Path, help="write the front to .parquet or .csv")
    common(sp)
    sp = sub.add_parser("export", help="write every trial to a table")
    sp.add_argument("study")
    sp.add_argument("--out", type=Path, required=True, help="output .parquet or .csv")
    common(sp)
    sp = sub.add_parser("sync", help="backfill MLflow from the Optuna storage")
    sp.add_argument("study")
    tracking_uri(sp)
    common(sp)
    sp = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 for a study's store")
    sp.add_argument("study", nargs="?")
    sp.add_argument("--port", type=int, default=5000)
    tracking_uri(sp)
    common(sp)
    sp = sub.add_parser("evaluators", help="each evaluator's options, parameters read and metrics")
    sp.add_argument("name", nargs="?", help="one evaluator (default: all)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--markdown", action="store_true", help="the docs/params.md reference")
    sp = sub.add_parser("validate", help="check spec files (and evaluator options) without running")
    sp.add_argument("specs", type=Path, nargs="*")
    storage(sp)
    return p


def _positive(args: argparse.Namespace) -> None:
    from dse.spec import SpecError

    for name in ("n_trials", "workers", "batch"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise SpecError([f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}"])
    if getattr(args, "seed", None) is not None and args.seed < 0:
        raise SpecError([f"--seed: expected an integer >= 0, got {args.seed}"])


def _complete(spec: Any, args: argparse.Namespace) -> str | None:
    """The message for a study that already has its COMPLETE trials, else ``None``.

    Reads the storage only: no Ray, no MLflow, the parent run stays as it is."""
    from optuna.trial import TrialState

    from dse.driver import open_storage, study_dir
    from dse.storage import is_journal

    sdir = study_dir(spec.name, args.dir)
    if is_journal(spec.storage) and not (sdir / "spec.toml").exists():
        return None
    import optuna

    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(spec.storage, sdir))
    except KeyError:  # created but not yet in the storage
        return None
    n = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    target = args.n_trials or spec.n_trials
    if n < target:
        return None
    again = f"dse resume {spec.name}" if args.command == "resume" else f"dse run {args.spec}"
    return (f"study {spec.name} is complete: {n} COMPLETE trials (target {target}); nothing run. "
            f"Extend it with `{again} --n-trials {n + target} --dir {args.dir}`")


def _continue_command(study: str, args: argparse.Namespace) -> str:
    """The command that continues ``study`` as this one ran it (``dse resume`` takes the
    stored --n-trials/--workers/--seed/--[no-]deterministic/--batch; the rest is repeated)."""
    cmd = ["dse", "resume", study, "--dir", str(args.dir)]
    if getattr(args, "storage", None):
        from dse.storage import redact

        cmd += ["--storage", redact(args.storage)]
    if args.address:
        cmd += ["--address", args.address]
    if args.no_tracking:
        cmd.append("--no-tracking")
    if args.tracking_uri:
        cmd += ["--tracking-uri", args.tracking_uri]
    return shlex.join(cmd)


def _with_stored_options(spec: Any, args: argparse.Namespace) -> None:
    """Fill ``args`` from the options stored in the study by its last run (resume: all of
    them unless given; run: the seed, which is the study's own) and refuse a ``--seed``
    other than the one the study runs with (unless ``--allow-spec-change``)."""
    from dse.driver import RUN_OPTIONS, stored_run_options
    from dse.spec import SpecError

    stored = stored_run_options(spec, args.dir)
    if not stored and not (Path(args.dir) / spec.name / "spec.toml").exists():
        return  # a new study
    seed = stored.get("seed", spec.seed)
    if args.seed is not None and args.seed != seed and not args.allow_spec_change:
        raise SpecError([f"--seed: expected {seed} (the seed study {spec.name!r} runs with) or none, got "
                         f"{args.seed}; use another study name, or --allow-spec-change to continue it "
                         "with this seed"])
    for k in RUN_OPTIONS if args.command == "resume" else ("seed",):
        if getattr(args, k) is None and k in stored:
            setattr(args, k, stored[k])


def _drive(spec: Any, args: argparse.Namespace) -> int:
    from dse.driver import Driver, check_spec_change, study_dir

    if args.storage:
        spec.storage = args.storage  # --storage > the spec's [study] storage
    allow = getattr(args, "allow_spec_change", False)
    check_spec_change(spec, study_dir(spec.name, args.dir), allow=allow)  # before anything else
    _with_stored_options(spec, args)
    done = _complete(spec, args)
    if done is not None:
        print(done)
        return 0
    if args.tracking_uri:
        spec.tracking_uri = args.tracking_uri  # --tracking-uri > spec > $MLFLOW_TRACKING_URI > mlflow.db
    progress = {"auto": None, "bar": True, "log": False}[args.progress]
    driver = Driver(
        spec,
        args.dir,
        n_trials=args.n_trials,
        workers=args.workers,
        seed=args.seed,
        address=args.address,
        tracking=False if args.no_tracking else None,
        progress=progress,
        allow_spec_change=allow,
        deterministic=args.deterministic,
        batch=args.batch,
    )
    if getattr(args, "program", False):  # this process ends after the run: see main
        driver.leave_ray_on_abort = True
        _DRIVERS.append(driver)
    return _run(driver, spec, args)


def _run(driver: Any, spec: Any, args: argparse.Namespace) -> int:
    """``driver.run()`` and what the CLI prints after it; returns the exit code."""
    from dse.driver import Interrupted

    try:
        summary = driver.run()
    except Interrupted as e:  # before the study was created (the driver said so on stderr)
        again = f"dse run {args.spec}" if args.command == "run" else _continue_command(spec.name, args)
        print(f"interrupted while starting: study {spec.name} not created; `{again}` starts it")
        return 128 + e.signum
    print(
        f"study {summary.study}: {summary.complete} COMPLETE, {summary.failed} FAIL, "
        f"pareto {summary.pareto_size}, hypervolume {summary.hypervolume:.6g}, "
        f"{summary.wall_s:.1f} s; data in {summary.study_dir}"
    )
    if summary.complete >= driver.n_trials:
        if summary.signal is not None and summary.tracking_error is not None:  # the drain was cut
            sync = shlex.join(["dse", "sync", summary.study, "--dir", str(args.dir)]
                              + (["--tracking-uri", args.tracking_uri] if args.tracking_uri else []))
            print(f"interrupted: the search is complete, its MLflow logging is not: `{sync}` completes it")
            return 128 + int(summary.signal)
        return 0
    again = f"`{_continue_command(summary.study, args)}`"
    if summary.signal is not None:
        print(f"interrupted: continue with {again}")
        return 128 + int(summary.signal)
    if summary.stop_reason == "timeout_s":
        print(f"stopped by timeout_s: continue with {again}")
        return 0
    why = {"max_failed": f"max_failed = {driver.max_failed} FAIL trials reached"}.get(
        summary.stop_reason, summary.stop_reason or "stopped early")
    print(f"dse {args.command}: {summary.complete} of {driver.n_trials} COMPLETE: {why}; "
          f"see the fail_reason of the FAIL trials (`dse export`)", file=sys.stderr)
    return 1


def _load_study(name: str, root: str, storage: str | None = None) -> tuple[Any, Any]:
    from dse.api import load

    res = load(name, root, storage=storage)
    return res.spec, res.study


def status(name: str, root: str, storage: str | None = None) -> dict[str, Any]:
    """The status of a study as a JSON-able dict (what ``dse status --json`` prints)."""
    from optuna.trial import TrialState

    from dse.driver import run_options
    from dse.pareto import feasible_values, nondominated_mask, reference_point, study_hypervolume

    spec, study = _load_study(name, root, storage)
    trials = study.get_trials(deepcopy=False)
    n_trials = run_options(study).get("n_trials", spec.n_trials)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    _, vals = feasible_values(trials, spec)
    ref = reference_point(spec, vals)
    return {
        "study": name,
        "n_trials": n_trials,  # the target of its last run (--n-trials), else the spec's
        "states": counts,
        "pareto_size": int(nondominated_mask(vals).sum()) if len(vals) else 0,
        "hypervolume": study_hypervolume(trials, spec),
        "reference_point": None if ref is None else [float(x) for x in ref],
        "objectives": [f"{o.metric}:{o.direction}" for o in spec.objectives],
        "sampler": {"name": spec.sampler, "options": dict(spec.sampler_options),
                    "auto": spec.sampler_auto},
    }


def _finite(v: Any) -> Any:
    """``v`` with every non-finite float replaced by ``None`` (JSON has no Infinity/NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _cmd_status(args: argparse.Namespace) -> int:
    st = status(args.study, args.dir, args.storage)
    if args.json:
        print(json.dumps(_finite(st), allow_nan=False))
        return 0
    states = ", ".join(f"{v} {k}" for k, v in st["states"].items() if v)
    print(f"study {st['study']}: {states or 'no trials'} (target {st['n_trials']} COMPLETE)")
    print(f"pareto size {st['pareto_size']}, hypervolume {st['hypervolume']:.6g} "
          f"(reference point {st['reference_point']}, minimisation space)")
    from dse.samplers import describe

    sm = st["sampler"]
    print(f"sampler {describe(sm['name'], sm['options'])}"
          + (" (the default for this study, docs/driver.md)" if sm["auto"] else ""))
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    from dse.driver import study_dir
    from dse.spec import study_info
    from tracking.artifacts import pareto_table, write_table

    spec, study = _load_study(args.study, args.dir, args.storage)
    table = pareto_table(study.get_trials(deepcopy=False), study_info(spec, study_dir(args.study, args.dir)))
    if args.out:
        write_table(table, args.out)
        print(f"{table.num_rows} Pareto trials -> {args.out}")
        return 0
    cols = ["number"] + [c for c in table.column_names if c.startswith(("values.", "params."))]
    rows = table.select(cols).to_pylist()
    print("\t".join(cols))
    for r in rows:
        print("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r.values()))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dse.driver import study_dir
    from dse.spec import study_info
    from tracking.artifacts import trials_table, write_table

    spec, study = _load_study(args.study, args.dir, args.storage)
    table = trials_table(study.get_trials(deepcopy=False), study_info(spec, study_dir(args.study, args.dir)))
    write_table(table, args.out)
    print(f"{table.num_rows} trials -> {args.out}")
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from dse import storage
    from dse.driver import study_dir
    from dse.spec import study_info
    from tracking.mlflow_tracker import TrackingError, sync

    spec, study = _load_study(args.study, args.dir, args.storage)
    sdir = study_dir(args.study, args.dir)
    try:
        info = study_info(spec, sdir, uri=args.tracking_uri, study_uid=storage.study_uid(study))
        res = sync(info, sdir, study.get_trials(deepcopy=False))
    except TrackingError as e:
        print(f"dse sync: {e}", file=sys.stderr)
        return 1
    print(f"synced {args.study} to {res.uri}: {res.created} child runs created, {res.present} already there")
    for line in res.rejected:
        print(f"dse sync: MLflow rejected {line}", file=sys.stderr)
    return 1 if res.rejected else 0


def _cmd_ui(args: argparse.Namespace) -> int:
    """MLflow UI for a study: one server worker, no job consumers, 127.0.0.1 only; prints
    the URL of the study's run page. Against a remote server it prints that URL only."""
    from dse.driver import load_study_spec, study_dir
    from dse.spec import SpecError
    from tracking import resolve_uri
    from tracking.mlflow_tracker import study_run_path

    name = args.study
    if name is None:
        found = sorted(p.parent.name for p in Path(args.dir).glob("*/mlflow.db"))
        if len(found) != 1:
            raise SpecError([f"study: expected one of {found or 'the studies under ' + args.dir}; name it"])
        name = found[0]
    spec = load_study_spec(name, args.dir, args.storage, read_only=True)
    uri = resolve_uri(args.tracking_uri or spec.tracking_uri, study_dir(name, args.dir))
    page = study_run_path(uri, name)
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI for {name}: {uri.rstrip('/')}/{page}  (a running server: nothing started)")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI for {name}: http://127.0.0.1:{args.port}/{page}  ({uri})", flush=True)
    if "/runs/" in page:
        runs = page.split("/runs/")[0] + "/runs" + page[page.index("?"):]
        print(f"the study's runs: http://127.0.0.1:{args.port}/{runs}", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job consumer processes
    os.execve(sys.executable, cmd, env)
    return 0  # pragma: no cover


def _cmd_evaluators(args: argparse.Namespace) -> int:
    from dse import registry
    from dse.schema import as_markdown, as_text
    from dse.spec import SpecError

    names = [args.name] if args.name else registry.names()
    try:
        schemas = [(n, registry.schema(n)) for n in names]
    except KeyError as e:
        raise SpecError([f"dse evaluators: {e.args[0]}"]) from None
    if args.json:
        print(json.dumps({n: None if sc is None else sc.describe() for n, sc in schemas}))
    elif args.markdown:
        print(as_markdown([sc for _, sc in schemas if sc is not None]), end="")
    else:
        print("\n\n".join(as_text(sc) if sc is not None else f"{n}: (no schema: a plain factory)"
                          for n, sc in schemas))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Check spec files, and the storage each will use (``--storage`` or the spec's):
    its driver imports and its server answers. A spec problem exits 2, an unusable
    storage 1, each one line."""
    from dse.spec import SpecError, load_spec
    from dse.storage import StorageError, check_storage

    if not args.specs and not args.storage:
        raise SpecError(["dse validate: expected spec files and/or --storage URL, got neither"])
    errors: list[str] = []
    urls: list[str] = [args.storage] if args.storage else []
    for path in args.specs:
        try:
            s = load_spec(path)
            print(f"{path}: ok (study {s.name}, {len(s.params)} parameters, "
                  f"{len(s.objectives)} objectives, {len(s.constraints)} constraints)")
            if s.storage and not args.storage and s.storage not in urls:
                urls.append(s.storage)
        except SpecError as e:
            errors.extend(e.errors)
    if errors:
        raise SpecError(errors)
    problems = [why for u in urls if (why := check_storage(u))]
    if problems:
        raise StorageError("; ".join(problems))
    for u in urls:
        from dse.storage import redact

        print(f"storage {redact(u)}: ok")
    return 0


@contextlib.contextmanager
def _output(verbose: bool) -> Iterator[None]:
    """dse's own log lines (``dse*`` loggers) at INFO; other libraries' INFO lines and
    warnings only when ``verbose``. Environment variables carry the choice to the
    processes dse starts (MLflow's logging process, Ray's workers); a user's own setting
    of them wins, and they are restored afterwards (``main`` may run inside a notebook
    or a test)."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format=fmt)
    logging.getLogger("dse").setLevel(logging.INFO)
    quiet = {} if verbose else {
        "MLFLOW_LOGGING_LEVEL": "ERROR",  # e.g. "Creating initial MLflow database tables..."
        "PYTHONWARNINGS": "ignore",
    }
    added = [k for k in quiet if k not in os.environ]
    os.environ.update({k: quiet[k] for k in added})
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _stdout_closed() -> int:
    """The reader of stdout went away (``dse pareto NAME | head``): end silently, exit 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured in a test)
        pass
    return 141


_DRIVERS: list[Any] = []  # the runs of the `dse` program (argv from the command line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dse`` command; returns the exit code.

    As the program (``argv`` None: the command line), an aborted run that left its own
    local Ray running (Ctrl-C twice, SIGTERM) ends the process here at once
    (:func:`dse.driver.end_process`) rather than in the interpreter's teardown."""
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:  # while dse's modules load (~1 s)
        print("dse: interrupted", file=sys.stderr)
        return 130
    args.program = argv is None
    try:
        rc = _main_with_output(args)
    except BaseException:
        if any(d.ray_left for d in _DRIVERS):
            traceback.print_exc()
            _end(1)
        raise
    if any(d.ray_left for d in _DRIVERS):
        _end(rc)
    return rc


def _end(rc: int) -> NoReturn:
    from dse.driver import end_process

    end_process(rc)


def _main_with_output(args: argparse.Namespace) -> int:
    with _output(getattr(args, "verbose", False)):
        try:
            rc = _main(args)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return rc
        except BrokenPipeError:
            return _stdout_closed()
        except KeyboardInterrupt:  # Ctrl-C outside a run's own handling (loading, printing)
            print(f"dse {args.command}: interrupted", file=sys.stderr)
            return 130


def _main(args: argparse.Namespace) -> int:
    import optuna

    from dse.spec import SpecError, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        _positive(args)
        if args.command == "run":
            return _drive(load_spec(args.spec), args)
        if args.command == "resume":
            from dse.driver import load_study_spec

            return _drive(load_study_spec(args.study, args.dir, args.storage), args)
        return {
            "status": _cmd_status,
            "pareto": _cmd_pareto,
            "export": _cmd_export,
            "sync": _cmd_sync,
            "ui": _cmd_ui,
            "validate": _cmd_validate,
            "evaluators": _cmd_evaluators,
        }[args.command](args)
    except SpecError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"dse {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # optuna: no such study in the storage
        print(f"dse {args.command}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, for run-time failures
        from dse.driver import DriverError
        from dse.schema import first_line
        from dse.storage import StorageError

        if isinstance(e, DriverError | StorageError):
            print(f"dse {args.command}: {e}", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):  # read-only, full, ...
            what = (f"{e.filename}: {e.strerror}" if e.filename and e.strerror
                    else first_line(e))
            print(f"dse {args.command}: {what}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
