"""deploy/ agrees with the code and with itself, where the validators `make check-deploy` runs
(hadolint, docker-compose config, kubernetes-validate, systemd-analyze verify) cannot see: every
variable a deploy file sets is a documented setting, every process the Procfile runs has its
place in each deployment, and the Kubernetes model registry, worker and autoscaler name the same
models, metrics and model server."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchsvc.metrics.collector import FAMILIES
from batchsvc.models_config import parse_registry

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

#: Variables deploy files give batchsvc processes that deploy/env.example does not list: the
#: Kubernetes manifests only expand it into REDIS_URL.
NOT_SETTINGS = {"REDIS_PASSWORD"}

#: Procfile processes a deployment runs differently, and why.
NOT_DEPLOYED = {
    # The embedded Redis of `make run`: every deployment runs a real Redis instead.
    "compose": {"redis-server"},
    "k8s": {"redis-server"},
    # Flower binds loopback and is run by hand where needed (`batchsvc flower`), not as a unit.
    "systemd": {"redis-server", "flower"},
}


def documented_settings() -> set[str]:
    text = (DEPLOY / "env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def procfile_roles() -> set[str]:
    text = (ROOT / "Procfile").read_text()
    return set(re.findall(r"^[a-z]+:.*\bbatchsvc ([a-z-]+)", text, flags=re.MULTILINE))


def role(command: list[str]) -> str | None:
    """The batchsvc role a container command runs (``batchsvc exec -- celery ... flower``
    counts as flower)."""
    if not command or command[0] != "batchsvc":
        return None
    if command[1] == "exec":
        return "flower" if "flower" in command else None
    return command[1]


@functools.cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def compose_services() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in compose()["services"].items():
        if role(service.get("command", [])):
            yield name, service


@functools.cache
def k8s_resources() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def k8s_by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in k8s_resources() if r["kind"] == kind}


def batchsvc_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, deployment in k8s_by_kind("Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if role(container.get("command", [])):
                yield name, container


def container_env(container: dict[str, Any]) -> dict[str, str | None]:
    """A container's variables: its own, then those of the ConfigMaps and Secrets it loads."""
    sources = {**k8s_by_kind("ConfigMap"), **k8s_by_kind("Secret")}
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source["secretRef"]
        resource = sources[ref["name"]]
        env.update(resource.get("data") or resource.get("stringData") or {})
    env.update({item["name"]: item.get("value") for item in container.get("env", [])})
    return env


def units() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((DEPLOY / "systemd").glob("*.service"))}


def unit_environment(text: str) -> set[str]:
    return {
        assignment.split("=", 1)[0]
        for line in re.findall(r"^Environment=(.*)$", text, flags=re.MULTILINE)
        for assignment in line.split()
    }


def test_every_variable_the_deploy_files_set_is_a_documented_setting() -> None:
    # Given what deploy/env.example documents
    known = documented_settings() | NOT_SETTINGS
    # When every batchsvc process of every deployment is given its variables
    set_by = {
        **{f"compose {n}": set(s.get("environment", {})) for n, s in compose_services()},
        **{f"k8s {n}": set(container_env(c)) for n, c in batchsvc_containers()},
        **{f"systemd {n}": unit_environment(text) for n, text in units().items()},
    }
    # Then each is a setting batchsvc reads (a typo would be ignored silently)
    unknown = {where: sorted(names - known) for where, names in set_by.items() if names - known}
    assert not unknown


@pytest.mark.parametrize("deployment", sorted(NOT_DEPLOYED))
def test_every_procfile_process_is_deployed(deployment: str) -> None:
    runs = {
        "compose": {role(s["command"]) for _, s in compose_services()},
        "k8s": {role(c["command"]) for _, c in batchsvc_containers()},
        "systemd": {
            m.group(1)
            for text in units().values()
            if (m := re.search(r"^ExecStart=\S*/batchsvc ([a-z-]+)", text, flags=re.MULTILINE))
        },
    }[deployment]
    assert runs == procfile_roles() - NOT_DEPLOYED[deployment]


def test_units_run_the_venv_check_deploy_substitutes() -> None:
    # scripts/check-deploy points this path at the checkout's .venv for systemd-analyze.
    for name, text in units().items():
        assert re.search(r"^ExecStart=/opt/batchsvc/\.venv/bin/batchsvc ", text, re.M), name


def test_compose_default_registry_exists() -> None:
    web = compose()["services"]["web"]
    mount = next(v for v in web["volumes"] if v.endswith(":/etc/batchsvc/models.toml:ro"))
    default = re.fullmatch(r"\$\{BATCHSVC_MODELS_TOML:-(.+)\}:.*", mount)
    assert default and (DEPLOY / default.group(1)).is_file()


def test_k8s_registry_workers_and_autoscalers_agree() -> None:
    # Given the registry in the ConfigMap, loaded the way the launchers load it
    configmap = k8s_by_kind("ConfigMap")["batchsvc-models"]["data"]["models.toml"]
    registry = parse_registry(tomllib.loads(configmap))
    workers = dict(batchsvc_containers())
    deployments = k8s_by_kind("Deployment")
    scaled = k8s_by_kind("ScaledObject")
    assert scaled
    for name, scaler in scaled.items():
        # Then each autoscaler targets a worker Deployment serving the model its query names
        target = scaler["spec"]["scaleTargetRef"]["name"]
        model = str(container_env(workers[target])["MODELS"])
        assert model in registry, name
        (trigger,) = scaler["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert f'batchsvc_pending_lines{{model="{model}"}}' in query
        assert set(re.findall(r"\bbatchsvc_[a-z_]+", query)) <= set(FAMILIES)
        # and the model server beside the worker serves the model's upstream name on its port
        spec = registry.get(model)
        assert spec is not None
        pod = deployments[target]["spec"]["template"]["spec"]
        (server,) = [c for c in pod.get("initContainers", []) if c["name"] == "vllm"]
        assert f"--served-model-name={spec.upstream_name}" in server["args"]
        port = re.search(r":(\d+)/v1$", str(spec.base_url))
        assert port and f"--port={port.group(1)}" in server["args"]
