"""Ray processes never outlive the driver that started them (issue 10, item 5).

When the driver starts a local Ray cluster and is then SIGKILLed, Ray's own fate sharing
ends the GCS, the raylet and the workers at once, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, ~200 MB together) notice the raylet's
death and then try to report it to the dead GCS: they linger 60-70 s, one of them on an
open port. :func:`watch` starts a small watcher process in its own session (so a SIGKILL
of the driver's process group does not take it along) that records the driver's Ray
descendants every ``POLL_S`` seconds while the driver lives and SIGKILLs the ones still
alive as soon as the driver is gone (psutil checks each process's start time, so a reused
PID is never hit). The watcher only touches processes of the ``ray`` package, never the
tracking process or anything else the driver started. It ends with the driver.

Run as a script (``python dse/reaper.py DRIVER_PID RAY_DIR``): it imports only psutil.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 0.25
_started: set[int] = set()


def watch() -> None:
    """Start the watcher for this process (once per process); errors are ignored (the
    watcher only tidies up, it never decides anything)."""
    if os.getpid() in _started:
        return
    import ray

    try:
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(os.getpid()),
             os.path.dirname(os.path.abspath(ray.__file__))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError:
        return
    _started.add(os.getpid())


def kill_now() -> int:
    """SIGKILL this process's Ray descendants at once; returns how many.

    For a start-up interrupted inside ``ray.init`` (Ctrl-C): no watcher runs yet, and
    ``ray.shutdown`` of a half-started node waits for it. Each process is stopped
    (SIGSTOP) before the next look, so that none starts another meanwhile (an agent
    started by a raylet already killed would no longer be found below this process).
    """
    import psutil
    import ray

    ray_dir = os.path.dirname(os.path.abspath(ray.__file__))
    me = psutil.Process()
    found: dict[int, psutil.Process] = {}
    for _ in range(100):
        try:
            new = [p for p in me.children(recursive=True) if p.pid not in found and _is_ray(p, ray_dir)]
        except psutil.Error:
            new = []
        if not new:
            break
        for p in new:
            found[p.pid] = p
            try:
                p.suspend()
            except psutil.Error:
                pass
    for p in found.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 1.0  # SIGKILL acts at once; an orphan stays a zombie (not waited for)
    while time.monotonic() < deadline and any(_running(p) for p in found.values()):
        time.sleep(0.01)
    return len(found)


def _running(p: object) -> bool:
    import psutil

    assert isinstance(p, psutil.Process)
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_ray(p: object, ray_dir: str) -> bool:
    import psutil

    assert isinstance(p, psutil.Process)
    try:
        return p.name().startswith("ray::") or any(a.startswith(ray_dir) for a in p.cmdline()[:3])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def main(argv: list[str]) -> int:
    """Watch ``argv[0]`` (a PID); once it is gone, SIGKILL its Ray descendants."""
    import psutil

    try:
        driver = psutil.Process(int(argv[0]))
    except psutil.NoSuchProcess:
        return 0
    ray_dir = argv[1]
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            for p in driver.children(recursive=True):
                if p.pid not in seen and _is_ray(p, ray_dir):
                    seen[p.pid] = p
            driver.wait(timeout=POLL_S)
            break
        except psutil.TimeoutExpired:
            if driver.status() == psutil.STATUS_ZOMBIE:  # ended; its parent does not reap it
                break
            continue
        except psutil.NoSuchProcess:
            break
    for p in seen.values():
        try:
            if p.is_running():  # same PID and start time as when recorded
                p.kill()
        except psutil.NoSuchProcess:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
