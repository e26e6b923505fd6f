"""Shared test fixtures: reference data location, single-threaded torch."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A shell that starts a job in the background without job control (`.ci/run &` from a
# script) starts it with SIGINT ignored, and every process below inherits that: the
# Ctrl-C tests' presses would then be ignored until dse installs its own handler. The tests
# press Ctrl-C as a terminal does to a foreground job, so the suite starts from Python's
# default handler (a child process then starts with SIGINT at its default).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """Directory of trusted reference outputs: $DSE_REFERENCE_DIR, else the in-repo copy
    ``tests/reference/`` (a clone needs nothing beside it)."""
    env = os.environ.get("DSE_REFERENCE_DIR")
    return Path(env) if env else ROOT / "tests" / "reference"


def reference_files(pattern: str) -> list[Path]:
    """All reference files matching ``pattern`` (e.g. ``"mx_vectors*.json"``).

    Fails the test session when none exist: a reference test never silently skips.
    """
    files = sorted(reference_dir().glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no reference file {pattern!r} in {reference_dir()} (set DSE_REFERENCE_DIR)"
        )
    return files


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    """One torch thread: 2 threads measured 3-6x slower on the 2-core CI machines."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():  # type: ignore[no-untyped-def]
    """One local Ray cluster for the whole test session (start-up costs seconds).

    Drivers started inside the session find Ray initialised and reuse it. It has 2 of a
    custom resource ``dse_test_pool`` (tests of per-evaluator resources).
    """
    import logging

    import ray

    from dse.driver import _init_loopback_ray

    started = False
    if not ray.is_initialized():
        # Ray's processes inherit this environment: with the repository on their path, the
        # workers import tests' own evaluators (``tests.gates:gate``) for drivers that join
        # the cluster from a subprocess too (their job's environment is not the workers')
        old_path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old_path) if p)
        try:
            _init_loopback_ray(dict(  # listens on 127.0.0.1 only, like a driver's own cluster
                address="local",
                num_cpus=4,
                resources={"dse_test_pool": 2},
                include_dashboard=False,
                object_store_memory=100 * 1024 * 1024,
                logging_level=logging.WARNING,
            ))
        finally:
            if old_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old_path
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def postgres_server():  # type: ignore[no-untyped-def]
    """A PostgreSQL server for the session: ``$DSE_TEST_POSTGRES_URL`` (``.ci/run`` starts
    one), else a private one started from the machine's ``initdb`` (tests/postgres.py);
    skipped with the reason when neither exists or psycopg is not installed."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'dse[postgresql]')")
    from tests import postgres

    url = os.environ.get("DSE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if postgres.find_bin() is None:
        pytest.skip("no PostgreSQL: set DSE_TEST_POSTGRES_URL or install the postgresql package (initdb)")
    server = postgres.start(fsync=False)
    try:
        yield server.url("postgres")
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's PostgreSQL server (its ``postgresql://`` URL)."""
    from tests import postgres

    return postgres.new_database(postgres_server)
