"""Ray as users run it, and the cluster recipes in ``clusters/`` (issue 12, items 6 and 7).

* The install carries what Ray's dashboard, state API, job submission and Ray Client
  need (``ray[default,client]``).
* ``dse run --address`` on a cluster that does not answer: one line, exit 1, nothing
  created on disk.
* Ray initialised in the process already (a notebook): the run uses it, and says so in
  one line (a warning when another address was asked).
* ``clusters/ray-cluster.yaml`` validates against the cluster-launcher schema shipped
  inside the installed ray package; the KubeRay manifests use only RayCluster/RayJob v1
  fields (field sets below, from the KubeRay v1 CRDs).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dse.plugins.benchmarks import study_spec
from tests.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_ray_extras_for_dashboard_state_jobs_and_client_are_installed() -> None:
    """What `ray[default,client]` adds; plain `ray` fails each of these."""
    import ray._private.utils as ray_utils

    assert ray_utils.get_dashboard_dependency_error() is None  # dashboard, state API, jobs
    import grpc  # noqa: F401  (Ray Client, ray://)
    from ray.job_submission import JobSubmissionClient  # noqa: F401
    from ray.util.client import ray as ray_client  # noqa: F401
    from ray.util.state import list_actors  # noqa: F401


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_cluster_one_line_and_nothing_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scheme: str
) -> None:
    spec = tmp_path / "far.toml"
    spec.write_text(study_spec("far", n_trials=3, tracking={"enabled": False}))
    address = f"{scheme}127.0.0.1:{free_port()}"
    # a process of its own: in this one, a Ray another test started would be reused
    done = subprocess.run([sys.executable, "-m", "dse.cli", "run", str(spec), "--dir",
                           str(tmp_path / "studies"), "--address", address],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    rc, err = done.returncode, done.stderr
    assert rc == 1, err
    assert err.splitlines() == [
        f"dse run: cannot join Ray at address {address!r}: nothing answers at "
        f"{address.removeprefix('ray://')} (Connection refused); is the head node up "
        "(`ray start --head`) and the port reachable?"
    ]
    assert not (tmp_path / "studies").exists()


def test_a_refused_token_is_one_line_at_once(ray_session: Any, tmp_path: Path) -> None:
    """A cluster with token authentication (the session's, as every new local cluster) and
    a driver with another token: one line naming the refusal, nothing created on disk (Ray
    retried for 20 s, printing a warning a second, then said only that it could not
    connect; measured on the netns head node, clusters/netns.py, too)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        pytest.skip("the session's Ray cluster runs without token authentication (RAY_AUTH_MODE)")
    spec = tmp_path / "tok.toml"
    spec.write_text(study_spec("tok", n_trials=3, tracking={"enabled": False}))
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}
    done = subprocess.run([sys.executable, "-m", "dse.cli", "run", str(spec), "--dir",
                           str(tmp_path / "studies"), "--address", address],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"dse run: cannot join Ray at address {address!r}: the cluster refuses this driver's "
        "token (InvalidAuthToken: Authentication token is missing or incorrect); set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it; "
        "clusters/README.md)"
    ]
    assert not (tmp_path / "studies").exists()


def test_ray_initialised_in_the_process_is_used_and_said_once(
    ray_session: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As Ray's own libraries do: no second ``ray.init``, no shutdown of the user's Ray;
    the address asked for (nothing listens there) is named in one warning."""
    from dse.driver import Driver
    from dse.spec import parse_spec

    spec = parse_spec(study_spec("nb", n_trials=2, workers=1, tracking={"enabled": False}))
    address = f"ray://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.INFO, logger="dse"):
        summary = Driver(spec, tmp_path, address=address, progress=False).run()
    assert summary.complete == 2 and ray_session.is_initialized()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "already initialised" in r.getMessage()]
    gcs = ray_session.get_runtime_context().gcs_address
    assert said == [("WARNING", f"Ray is already initialised in this process ({gcs}): the run uses it, "
                                f"not address {address!r} (call ray.shutdown() first to run there)")]


# ------------------------------------------------------------------------ the recipes

CLUSTERS = ROOT / "clusters"


def test_launcher_yaml_validates_against_rays_own_cluster_schema() -> None:
    """`ray up` checks a config against ray/autoscaler/ray-schema.json (shipped in the ray
    package), then fills in the provider's defaults and checks again; both here, offline."""
    import json

    import jsonschema
    import ray
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTERS / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    # what the recipe promises: a GPU worker type on a GPU image, rsync excludes, the
    # cluster's token on every node, and the study store shared by every node
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["docker"]["worker_image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert gpu["docker"]["worker_image"].endswith("-gpu")
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert {".git", ".venv", "dse-studies"} <= set(config["rsync_exclude"])
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    with pytest.raises(jsonschema.ValidationError):  # the schema does catch a misspelt field
        jsonschema.validate({**config, "rsync_exclud": []}, schema)


# Field sets of the KubeRay v1 CRDs, copied from ray-project/kuberay at commit feeaf72f
# (2026-08-19): ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
# ray.io_rayjobs.yaml (openAPIV3Schema of version v1; the same fields as
# ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go). (allowed, required)
RAYCLUSTER_SPEC = ({
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
    "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}, {"headGroupSpec"})
HEAD_GROUP = ({
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
    "serviceType", "template",
}, {"template"})
WORKER_GROUP = ({
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}, {"groupName", "maxReplicas", "minReplicas", "template"})
AUTOSCALER_OPTIONS = ({
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
    "resources", "securityContext", "upscalingMode", "version", "volumeMounts",
}, set())
AUTH_OPTIONS = ({"enableK8sTokenAuth", "mode", "secretName"}, set())
RAYJOB_SPEC = ({
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy",
    "entrypoint", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
    "managedBy", "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
}, set())
ENUMS = {"authOptions.mode": {"disabled", "token"},
         "autoscalerOptions.upscalingMode": {"Default", "Aggressive", "Conservative"},
         "autoscalerOptions.version": {"v1", "v2"},
         # rayjob_types.go, JobSubmissionMode
         "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}}


def _fields(obj: dict, spec: tuple[set[str], set[str]], where: str) -> list[str]:  # type: ignore[type-arg]
    allowed, required = spec
    return ([f"{where}.{k}: not a field" for k in sorted(set(obj) - allowed)]
            + [f"{where}.{k}: missing" for k in sorted(required - set(obj))])


def _raycluster_problems(spec: dict, where: str) -> list[str]:  # type: ignore[type-arg]
    import ray

    bad = _fields(spec, RAYCLUSTER_SPEC, where)
    if spec.get("rayVersion") != ray.__version__:
        bad.append(f"{where}.rayVersion: expected {ray.__version__}, got {spec.get('rayVersion')}")
    for key in ("authOptions", "autoscalerOptions"):
        sub = spec.get(key, {})
        bad += _fields(sub, AUTH_OPTIONS if key == "authOptions" else AUTOSCALER_OPTIONS,
                       f"{where}.{key}")
        bad += [f"{where}.{key}.{k}: {v!r} not one of {sorted(ENUMS[f'{key}.{k}'])}"
                for k, v in sub.items() if f"{key}.{k}" in ENUMS and v not in ENUMS[f"{key}.{k}"]]
    groups = [("headGroupSpec", spec.get("headGroupSpec", {}), HEAD_GROUP)]
    groups += [(f"workerGroupSpecs[{i}]", g, WORKER_GROUP)
               for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    for name, group, fields in groups:
        bad += _fields(group, fields, f"{where}.{name}")
        # map[string]string: `num-cpus: 0` (a number) is refused by the API server
        bad += [f"{where}.{name}.rayStartParams.{k}: expected a string, got {v!r}"
                for k, v in group.get("rayStartParams", {}).items() if not isinstance(v, str)]
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if not containers or not all({"name", "image"} <= set(c) for c in containers):
            bad.append(f"{where}.{name}.template.spec.containers: each needs a name and an image")
        if "replicas" in group and not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            bad.append(f"{where}.{name}: expected minReplicas <= replicas <= maxReplicas")
    return bad


def _manifests(name: str) -> list[dict]:  # type: ignore[type-arg]
    import yaml

    return [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d]


def test_kuberay_raycluster_uses_only_v1_fields() -> None:
    docs = {d["kind"]: d for d in _manifests("kuberay-raycluster.yaml")}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert _raycluster_problems(rc["spec"], "spec") == []
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    claims = {v["persistentVolumeClaim"]["claimName"]
              for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}
    # the checker does catch a misspelt field and a number where KubeRay wants a string
    broken = {**spec, "enableInTreeAutoscalling": True,
              "headGroupSpec": {**spec["headGroupSpec"], "rayStartParams": {"num-cpus": 0}}}
    assert _raycluster_problems(broken, "spec") == [
        "spec.enableInTreeAutoscalling: not a field",
        "spec.headGroupSpec.rayStartParams.num-cpus: expected a string, got 0",
    ]


def test_kuberay_rayjob_runs_dse_run_on_the_cluster() -> None:
    import shlex

    from dse.cli import _parser

    (job,) = _manifests("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert _fields(spec, RAYJOB_SPEC, "spec") == []
    assert spec["submissionMode"] in ENUMS["submissionMode"]
    (cluster,) = [d for d in _manifests("kuberay-raycluster.yaml") if d["kind"] == "RayCluster"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["dse", "run"]
    args = _parser().parse_args(argv[1:])  # dse's own parser: every flag exists
    assert args.address == "auto"
    assert (ROOT / Path(args.spec).relative_to("/home/ray/dse")).exists()
    (svc,) = [d for d in _manifests("mlflow.yaml") if d["kind"] == "Service"]
    assert args.tracking_uri == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


@pytest.mark.slow  # importing MLflow's CLI takes ~5 s
def test_mlflow_manifest_arguments_are_accepted_by_mlflow_server() -> None:
    """The Deployment's `mlflow server` arguments parse with the installed MLflow's CLI."""
    import mlflow
    from mlflow.cli import server

    (dep,) = [d for d in _manifests("mlflow.yaml") if d["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    assert container["image"].endswith(f":v{mlflow.__version__}")
    ctx = server.make_context("server", list(container["args"]))
    assert ctx.params["port"] == 5000 and ctx.params["host"] == "0.0.0.0"
    assert "dse-mlflow:5000" in ctx.params["allowed_hosts"]
