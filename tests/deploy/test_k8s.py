"""The Kubernetes manifests (deploy/k8s): valid against the Kubernetes API schemas (offline, with
kubernetes-validate) and KEDA's ScaledObject fields, and in agreement with the code: the queue and
Redis the ScaledObject watches are the ones the service uses, the settings are settings the code
reads, and a worker's grace period outlasts its stop's (PRISM_STOP_GRACE_S). That a worker
finishes its job on SIGTERM, or gives it back past that grace, which the grace period relies on, is
tests/worker/test_faults.py's and tests/cli/test_serving.py's."""

from __future__ import annotations

import copy
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from redis import Redis
from rq import Queue

from cli.serving import STOP_MARGIN_S
from service.api.schemas import ScalingDemand
from service.contract.settings import Settings
from tests.deploy.keda import SCALED_OBJECT

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES = "1.30.0"  # the oldest version in support as these were written; newer ones accept them too


def _documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


DOCS = _documents()


def _one(kind: str, name: str, docs: list[dict] = DOCS) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d["kind"] != "ScaledObject"], ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_every_manifest_is_valid_kubernetes(doc):
    for version in (KUBERNETES, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_scaled_object_uses_only_keda_fields():
    jsonschema.validate(_one("ScaledObject", "prism-worker"), SCALED_OBJECT)
    wrong = copy.deepcopy(_one("ScaledObject", "prism-worker"))
    wrong["spec"]["triggers"][0]["metadata"]["listname"] = wrong["spec"]["triggers"][0]["metadata"].pop("listName")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, SCALED_OBJECT)


def _settings(docs: list[dict]) -> Settings:
    """The settings the worker pods run with: the ConfigMap, then the container's own env."""
    env = dict(_one("ConfigMap", "prism-settings", docs)["data"])
    container = _one("Deployment", "prism-worker", docs)["spec"]["template"]["spec"]["containers"][0]
    env.update({e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("PRISM_")})
    unknown = [k for k in env if k.removeprefix("PRISM_").lower() not in Settings.model_fields]
    assert not unknown, f"settings no code reads: {unknown}"
    return Settings(**{k.removeprefix("PRISM_").lower(): v for k, v in env.items()})


def _claims(docs: list[dict], deployment: str) -> dict[str, str | None]:
    """A Deployment's mount paths, each with the PersistentVolumeClaim mounted there (None: another volume)."""
    pod = _one("Deployment", deployment, docs)["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    return {m["mountPath"]: claims.get(m["name"]) for c in pod["containers"] for m in c.get("volumeMounts", [])}


UNITS = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def _bytes(size: str) -> int:
    """Redis's "3gb" or Kubernetes's "4Gi" in bytes."""
    number = size.rstrip("bBiIkKmMgG")
    return int(number) * UNITS.get(size[len(number) :].lower(), 1)


def storage_disagreements(docs: list[dict]) -> list[str]:
    """Where the blob store and Redis's memory bound disagree with the code and the pods."""
    settings = _settings(docs)
    blob = urlparse(settings.blob_url or "")
    problems = []
    if blob.scheme == "file":
        shared = {name: _claims(docs, name).get(blob.path) for name in ("prism-api", "prism-worker")}
        if None in shared.values() or len(set(shared.values())) != 1:
            problems.append(f"the API and the workers do not share a blob store volume at {blob.path}: {shared}")
        else:
            modes = _one("PersistentVolumeClaim", shared["prism-api"], docs)["spec"]["accessModes"]
            if "ReadWriteMany" not in modes:
                problems.append(f"the blob store's volume is {modes}: pods on several nodes need ReadWriteMany")
    elif blob.scheme != "s3":
        problems.append("PRISM_BLOB_URL is unset: each pod would keep its blobs to itself")
    redis = _one("StatefulSet", "prism-redis", docs)["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    limit = _bytes(redis["resources"]["limits"]["memory"])
    if "--maxmemory" not in args or _bytes(args[args.index("--maxmemory") + 1]) >= limit:
        problems.append(f"Redis has no maxmemory below its container's {redis['resources']['limits']['memory']}")
    if args[args.index("--maxmemory-policy") + 1] != "noeviction":
        problems.append("Redis may evict: queued jobs would vanish instead of new ones being refused")
    return problems


def disagreements(docs: list[dict]) -> list[str]:
    """Where the worker pool's scaling and shutdown, the blob store and Redis's memory bound
    disagree with the code's settings."""
    settings = _settings(docs)
    url = urlparse(settings.redis_url)
    problems = []
    triggers = {t["type"]: t["metadata"] for t in _one("ScaledObject", "prism-worker", docs)["spec"]["triggers"]}
    queue_key = Queue(settings.queue_name, connection=Redis()).key  # RQ's list of waiting jobs
    if triggers["redis"]["listName"] != queue_key:
        problems.append(f"the redis trigger watches {triggers['redis']['listName']}, the queue is {queue_key}")
    host, port = triggers["redis"]["address"].rsplit(":", 1)
    if host.split(".")[0] != url.hostname or int(port) != url.port:  # prism-redis.<namespace>.svc is prism-redis
        problems.append(f"the redis trigger reads {triggers['redis']['address']}, the service {url.netloc}")
    if triggers["redis"].get("databaseIndex", "0") != url.path.strip("/"):
        problems.append("the redis trigger reads another database than PRISM_REDIS_URL")
    api = urlparse(triggers["metrics-api"]["url"])
    if (
        api.hostname.split(".")[0] != "prism-api"
        or api.path != "/scaling"
        or triggers["metrics-api"]["valueLocation"] not in ScalingDemand.model_fields
    ):
        problems.append(f"the metrics-api trigger does not read the API's /scaling: {api.geturl()}")
    if triggers["redis"]["listLength"] != str(settings.worker_pack):
        problems.append(
            f"the redis trigger asks for a worker per {triggers['redis']['listLength']} queued jobs, "
            f"a worker packs {settings.worker_pack}"
        )
    if triggers["metrics-api"]["targetValue"] != "1":
        problems.append("the metrics-api trigger's target is not one worker per workers_wanted")
    grace = _one("Deployment", "prism-worker", docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if grace <= settings.stop_grace_s + STOP_MARGIN_S:
        problems.append(
            f"grace period {grace} s does not outlast PRISM_STOP_GRACE_S={settings.stop_grace_s} and a margin"
        )
    return problems + storage_disagreements(docs)


def test_the_worker_pool_scales_and_stops_as_the_code_works():
    assert disagreements(DOCS) == []


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (
            ("ScaledObject", "prism-worker", "spec", "triggers", 0, "metadata", "listName"),
            "rq:queue:prism-jobs",
            "watches",
        ),
        (("ConfigMap", "prism-settings", "data", "PRISM_QUEUE_NAME"), "other", "watches"),
        (("ConfigMap", "prism-settings", "data", "PRISM_REDIS_URL"), "redis://elsewhere:6379/0", "reads"),
        (("ConfigMap", "prism-settings", "data", "PRISM_STOP_GRACE_S"), "600", "grace period"),
        (("ConfigMap", "prism-settings", "data", "PRISM_WORKER_PACK"), "8", "packs"),
        (("ScaledObject", "prism-worker", "spec", "triggers", 1, "metadata", "targetValue"), "4", "target"),
        (("ConfigMap", "prism-settings", "data", "PRISM_BLOB_URL"), "file:///srv/blobs", "share a blob store"),
        (("ConfigMap", "prism-settings", "data", "PRISM_BLOB_URL"), "", "unset"),
        (("PersistentVolumeClaim", "prism-blobs", "spec", "accessModes"), ["ReadWriteOnce"], "ReadWriteMany"),
        (("StatefulSet", "prism-redis", "spec", "template", "spec", "containers", 0, "args", 4), "8gb", "maxmemory"),
    ],
)
def test_a_manifest_that_drifts_from_the_code_is_caught(path, value, needle):
    docs = copy.deepcopy(DOCS)
    target = _one(path[0], path[1], docs)
    for key in path[2:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(needle in p for p in disagreements(docs)), disagreements(docs)


def test_every_pod_runs_unprivileged_on_a_read_only_root():
    pods = [d["spec"]["template"]["spec"] for d in DOCS if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(pods) == 4
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_workers_hold_one_gpu_read_the_weights_read_only_and_probe_their_heartbeat():
    pod = _one("Deployment", "prism-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["readOnly"] is True
    settings = _settings(DOCS)
    assert Path(settings.worker_heartbeat_file).parent.as_posix() in mounts  # writable with a read-only root
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["prism", "worker-probe"]


def test_only_the_service_reaches_redis_and_only_webhooks_leave_the_cluster():
    policies = [d for d in DOCS if d["kind"] == "NetworkPolicy"]
    deny = _one("NetworkPolicy", "default-deny")
    assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    redis_from = _one("NetworkPolicy", "redis")["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]
    assert set(redis_from["values"]) == {"prism-api", "prism-worker", "prism-webhooks"}
    external = [
        p for p in policies if any("ipBlock" in to for rule in p["spec"].get("egress", []) for to in rule["to"])
    ]
    assert [p["metadata"]["name"] for p in external] == ["webhooks-egress"]
