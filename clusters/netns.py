"""A real two-node Ray cluster on one Linux machine: two network namespaces and a veth pair.

Ray will not use 127.0.0.1 as the address of a node that others join, and two nodes on
one host would share every address; network namespaces give each node its own interface
(``ip netns add`` + a veth pair, 10.77.0.1 and 10.77.0.2). The head node runs in the
first namespace, the worker node in the second, each a real ``ray start`` (GCS, raylet,
agents) with its own temporary directory. Commands that should act like a process on the
head machine (the ``dse`` driver) run there through ``ip netns exec``.

Needs root and iproute2 (``ip``); :func:`unavailable` says why not otherwise. Everything
is torn down on exit, even after a failure: every process inside either namespace is
SIGKILLed (found with ``ip netns pids``, never by name: other Ray clusters on the machine
are left alone), then the namespaces are deleted (which deletes the veth pair).

Used by ``tests/test_multinode.py`` and ``bench/bench_cluster.py``; also runnable::

    sudo python clusters/netns.py -- dse run examples/zdt1.toml --address 10.77.0.1:6379

starts the two nodes, runs the command in the head's namespace, and tears everything down.
The evaluator ``netns:zdt1_with_node`` (this module on ``PYTHONPATH``) is ZDT1 that also
reports the IP address of the node that evaluated (``node_ip``, in the trial's ``info``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.77.0"  # addresses inside the namespaces only; nothing outside sees them
PORT = 6379
CLIENT_PORT = 10001  # the head's Ray Client server (``ray://10.77.0.1:10001``)
#: Ray system settings for the nodes: a lost node is declared dead after ~3 s (default ~30 s)
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (``None``: they can)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root, as CI does"
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    probe = f"dseprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def reap_stale() -> list[str]:
    """Remove the namespaces (and their processes) of a :class:`TwoNodes` whose owner died
    without tearing down (e.g. SIGKILLed); returns their names."""
    import re

    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    stale = []
    for name in re.findall(r"^(dse(\d+)[hw])\b", out, flags=re.M):
        try:
            os.kill(int(name[1]), 0)
        except ProcessLookupError:
            stale.append(name[0])
        except PermissionError:
            pass  # alive (another user's)
    for ns in stale:
        node = Node(ns, "")
        for pid in node.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return stale


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Node:
    """One Ray node: a network namespace with one address."""

    netns: str
    ip: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this node's namespace."""
        return ["ip", "netns", "exec", self.netns, *command]

    def pids(self) -> list[int]:
        """Every process inside this node's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def pid_of(self, name: str) -> int | None:
        """The process called ``name`` (e.g. ``raylet``) in this namespace, if any."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    return pid
            except OSError:
                continue
        return None


class TwoNodes:
    """A head node and a worker node, ``cpus`` CPUs each, in two network namespaces.

    Use as a context manager; ``env`` is the environment of every process started (Ray's
    nodes and :meth:`popen` commands), with ``RAY_AUTH_MODE=token`` and a fresh
    ``RAY_AUTH_TOKEN`` unless ``auth=False`` (then ``RAY_AUTH_MODE=disabled``).

    Args:
        cpus: logical CPUs of each node.
        object_store_mb: object store of each node, MB (Ray's minimum is 75).
        pythonpath: extra ``PYTHONPATH`` entries (the actors import the project from there).
        ray_env: extra environment of the Ray nodes (e.g. :data:`FAST_NODE_DEATH`).
        workers: start the worker node (``False``: the head alone, a one-node cluster).
        dashboard: start Ray's dashboard on the head (``http://10.77.0.1:8265``: job
            submission, state API); off by default (it costs seconds and memory).
    """

    def __init__(
        self,
        *,
        cpus: int = 1,
        object_store_mb: int = 80,
        pythonpath: Sequence[str | Path] = (),
        ray_env: Mapping[str, str] | None = None,
        auth: bool = True,
        workers: bool = True,
        dashboard: bool = False,
    ) -> None:
        tag = str(os.getpid())  # names end in the owner's pid: reap_stale() finds orphans
        self.head = Node(f"dse{tag}h", f"{SUBNET}.1")
        self.worker = Node(f"dse{tag}w", f"{SUBNET}.2")
        self._veth = (f"dse{tag}a", f"dse{tag}b")  # interface names: at most 15 characters
        self.address = f"{self.head.ip}:{PORT}"
        self.cpus, self.object_store_mb, self.with_worker = cpus, object_store_mb, workers
        self.dashboard = dashboard
        self.tmp = Path(tempfile.mkdtemp(prefix="dsenn", dir="/tmp"))  # short: socket paths
        path = [str(p) for p in pythonpath] + [str(ROOT)]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
                    "RAY_AUTH_MODE": "token" if auth else "disabled"}
        if auth:
            self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
        self.env.pop("RAY_ADDRESS", None)
        self._ray_env = dict(ray_env or {})
        self._procs: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> TwoNodes:
        reap_stale()
        try:
            self._network()
            self._start(self.head, ["--head", f"--port={PORT}", f"--ray-client-server-port={CLIENT_PORT}",
                                    f"--include-dashboard={str(self.dashboard).lower()}",
                                    f"--dashboard-host={self.head.ip}"])
            if self.with_worker:  # at once: it waits for the head's GCS to answer
                self._start(self.worker, [f"--address={self.address}"])
            self._wait_nodes(2 if self.with_worker else 1)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _network(self) -> None:
        a, b = self._veth
        for node in (self.head, self.worker):
            _ip("netns", "add", node.netns)
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        for node, dev in ((self.head, a), (self.worker, b)):
            _ip("link", "set", dev, "netns", node.netns)
            _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", dev)
            _ip("-n", node.netns, "link", "set", dev, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")

    def _start(self, node: Node, args: list[str]) -> None:
        log = open(self.tmp / f"{node.netns}.log", "wb")  # noqa: SIM115 - kept open for the process
        cmd = node.argv([sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                         f"--node-ip-address={node.ip}", f"--num-cpus={self.cpus}", "--num-gpus=0",
                         f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
                         f"--temp-dir={self.tmp / node.netns}", "--disable-usage-stats",
                         "--include-log-monitor=false", *args])
        self._procs.append(subprocess.Popen(cmd, env={**self.env, **self._ray_env},
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait_nodes(self, n: int, timeout_s: float = 90.0) -> None:
        """Wait until the cluster has ``n`` alive nodes, asked by one client process inside
        the head's namespace (one ``import ray``; it retries until the head answers)."""
        probe = (
            "import sys, time, ray\n"
            "n, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])\n"
            "while time.monotonic() < deadline:\n"
            "    try:\n"
            "        if not ray.is_initialized():\n"
            "            ray.init(address=sys.argv[1], logging_level='ERROR')\n"
            "        if sum(x['Alive'] for x in ray.nodes()) >= n:\n"
            "            sys.exit(0)\n"
            "    except Exception as e:\n"
            "        print(type(e).__name__, e, file=sys.stderr)\n"
            "    time.sleep(0.2)\n"
            "sys.exit(1)\n"
        )
        proc = subprocess.Popen(self.head.argv([sys.executable, "-c", probe, self.address, str(n),
                                                str(timeout_s)]),
                                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None:
            for p in self._procs:
                if p.poll() is not None:
                    proc.kill()
                    raise RuntimeError(f"ray start exited with {p.returncode}: {self.logs()}")
            time.sleep(0.2)
        if proc.returncode != 0:
            raise RuntimeError(f"cluster has not {n} nodes after {timeout_s:.0f} s: "
                               f"{proc.stderr.read()[-1500:]} {self.logs()}")  # type: ignore[union-attr]

    def logs(self) -> str:
        """The tail of each ``ray start`` output (for failure messages)."""
        return " | ".join(f"{p.name}: {p.read_text(errors='replace')[-800:]}"
                          for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        """SIGKILL every process in both namespaces, delete them and the temporary files."""
        for _ in range(3):  # a process may fork while we kill
            pids = [pid for node in (self.head, self.worker) for pid in node.pids()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.2)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for node in (self.head, self.worker):
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self._veth[0]], capture_output=True)  # if still here
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ use

    def popen(self, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``command`` on the head node (inside its namespace) with :attr:`env`."""
        kwargs.setdefault("env", self.env)
        return subprocess.Popen(self.head.argv(command), **kwargs)

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet (the node is lost); returns its pid."""
        pid = self.worker.pid_of("raylet")
        if pid is None:
            raise RuntimeError("no raylet in the worker node's namespace")
        os.kill(pid, signal.SIGKILL)
        return pid


# ---------------------------------------------------------------------- a probe evaluator


def zdt1_with_node(options: dict[str, Any], ctx: Any) -> Any:
    """ZDT1 (``dse.plugins.benchmarks``) that also returns ``node_ip``: the node's address."""
    import ray

    from dse.plugins.benchmarks import zdt1

    inner = zdt1(dict(options), ctx)
    node_ip = ray.util.get_node_ip_address()

    class WithNode:
        def evaluate(self, params: Mapping[str, Any], upstream: Mapping[str, Any]) -> dict[str, Any]:
            return {**inner.evaluate(params, upstream), "node_ip": node_ip}

    return WithNode()


def main(argv: Sequence[str] | None = None) -> int:
    """``python clusters/netns.py [--cpus N] -- COMMAND ...``: run COMMAND on a 2-node cluster."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=int, default=1, help="logical CPUs per node")
    ap.add_argument("--dashboard", action="store_true", help="Ray dashboard on the head (:8265)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="run on the head node")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if why := unavailable():
        print(f"netns: {why}", file=sys.stderr)
        return 2
    with TwoNodes(cpus=args.cpus, pythonpath=[Path(__file__).parent], dashboard=args.dashboard) as nodes:
        print(f"netns: 2 nodes up, head at {nodes.address}", file=sys.stderr)
        return nodes.popen(command or ["bash"]).wait()


if __name__ == "__main__":
    sys.exit(main())
