"""PACS endpoints in the deployments: the Compose override (docker/compose.pacs.yml) and the
Kubernetes component (deploy/k8s/pacs) give the API and the workers, and only them, the endpoints
file at PRISM_PACS_FILE and the secret files the README's example names, at the same paths in
both; the component's patched Deployments are valid Kubernetes, and kustomize builds them."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPONENT = K8S / "pacs"
PACS_FILE = "/run/prism/pacs.toml"
PACS_USERS = {"prism-api": "api", "prism-worker": "worker"}
README = (ROOT / "README.md").read_text()


def _readme_secret_files() -> set[str]:
    """The secret files the README's endpoints example names (password_file, token_file, ca_bundle)."""
    blocks = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    assert blocks, "the README shows an endpoints file"
    return {path for block in blocks for path in re.findall(r'_(?:file|bundle) = "([^"]+)"', block)}


def test_every_setting_the_deployments_add_is_one_the_code_reads():
    override = yaml.safe_load((ROOT / "docker" / "compose.pacs.yml").read_text())
    names = {name for service in override["services"].values() for name in service["environment"]}
    for entry in _component()["patches"]:
        patch = yaml.safe_load((COMPONENT / entry["path"]).read_text())
        names |= {e["name"] for c in patch["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    assert names == {"PRISM_PACS_FILE"}
    assert {name.removeprefix("PRISM_").lower() for name in names} <= set(Settings.model_fields)


def test_the_compose_override_mounts_the_file_and_its_secrets_in_the_api_and_the_workers():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    override = yaml.safe_load((ROOT / "docker" / "compose.pacs.yml").read_text())
    assert set(override["services"]) == {"api", "worker"} <= set(compose["services"])
    for name, service in override["services"].items():
        assert service["environment"]["PRISM_PACS_FILE"] == PACS_FILE, name
        assert [c["target"] for c in service["configs"]] == [PACS_FILE], name
        assert {c["source"] for c in service["configs"]} <= set(override["configs"])
        assert set(service["secrets"]) <= set(override["secrets"]), name
        mounted = {f"/run/secrets/{secret}" for secret in service["secrets"]}  # Compose's place for them
        assert _readme_secret_files() <= mounted, name
    for entry in [*override["configs"].values(), *override["secrets"].values()]:
        assert entry["file"].startswith("${PRISM_PACS_DIR:-./pacs}/"), entry
    assert "webhooks" not in override["services"]  # the webhook sender never talks to a PACS


def _component() -> dict:
    return yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())


def _base() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _merge(items: list[dict], patch: list[dict], key: str) -> list[dict]:
    """A strategic merge of a list keyed by ``key`` (as Kubernetes merges env, mounts, volumes)."""
    merged = {item[key]: item for item in items}
    for item in patch:
        merged[item[key]] = {**merged.get(item[key], {}), **item}
    return list(merged.values())


def _patched() -> dict[str, dict]:
    """The API and worker Deployments with the component's patches applied."""
    deployments = {d["metadata"]["name"]: copy.deepcopy(d) for d in _base() if d["kind"] == "Deployment"}
    for entry in _component()["patches"]:
        patch = yaml.safe_load((COMPONENT / entry["path"]).read_text())
        pod, with_ = (
            deployments[patch["metadata"]["name"]]["spec"]["template"]["spec"],
            patch["spec"]["template"]["spec"],
        )
        pod["volumes"] = _merge(pod["volumes"], with_["volumes"], "name")
        containers = {c["name"]: c for c in pod["containers"]}
        for change in with_["containers"]:
            container = containers[change["name"]]
            container["env"] = _merge(container.get("env", []), change.get("env", []), "name")
            container["volumeMounts"] = _merge(container["volumeMounts"], change["volumeMounts"], "mountPath")
    return {name: deployments[name] for name in PACS_USERS}


def _check_pacs_pod(name: str, deployment: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == PACS_USERS[name]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PRISM_PACS_FILE"] == PACS_FILE, name
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    endpoints = mounts[PACS_FILE]
    assert endpoints["subPath"] == "pacs.toml" and endpoints["readOnly"] is True, name
    assert volumes[endpoints["name"]]["configMap"]["name"] == "prism-pacs-endpoints", name
    secrets = {str(Path(path).parent) for path in _readme_secret_files()}
    for folder in secrets:
        assert mounts[folder]["readOnly"] is True, name
        assert volumes[mounts[folder]["name"]]["secret"]["secretName"] == "prism-pacs-credentials", name


def test_the_component_is_a_kustomize_component_that_declares_no_secret():
    component = _component()
    assert component["kind"] == "Component" and component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    kinds = [d["kind"] for name in component["resources"] for d in yaml.safe_load_all((COMPONENT / name).read_text())]
    assert kinds == ["NetworkPolicy"]  # applying the kustomization never empties the operator's ConfigMap and Secret
    assert "pacs" not in yaml.safe_load((K8S / "kustomization.yaml").read_text()).get("components", [])  # optional


@pytest.mark.parametrize("name", sorted(PACS_USERS))
def test_the_patched_api_and_workers_read_the_endpoints_and_are_valid_kubernetes(name):
    deployment = _patched()[name]
    _check_pacs_pod(name, deployment)
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(deployment, version, strict=True)


def test_only_the_api_and_the_workers_reach_the_pacs_and_only_it():
    (policy,) = [d for d in yaml.safe_load_all((COMPONENT / "network-policy.yaml").read_text()) if d]
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(policy, version, strict=True)
    (selector,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert selector["key"] == "app.kubernetes.io/name" and set(selector["values"]) == set(PACS_USERS)
    assert policy["spec"]["policyTypes"] == ["Egress"]
    for rule in policy["spec"]["egress"]:
        assert all(to["ipBlock"]["cidr"].endswith("/32") for to in rule["to"])  # one address, not the world
        assert {p["port"] for p in rule["ports"]} == {443, 4242}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_builds_the_base_with_the_component(tmp_path):
    """What `kubectl apply -k` would apply once `components: [pacs]` is added: the real merge."""
    shutil.copytree(K8S, tmp_path / "k8s")
    kustomization = tmp_path / "k8s" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "components:\n  - pacs\n")
    built = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True, timeout=120, check=True
    )
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name in PACS_USERS:
        _check_pacs_pod(name, deployments[name])
        assert deployments[name]["metadata"]["namespace"] == "prism"
    assert "PRISM_PACS_FILE" not in str(deployments["prism-webhooks"])
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"].count("pacs-egress") == 1
