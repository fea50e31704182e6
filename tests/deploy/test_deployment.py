"""deploy/: the Compose file, the Kubernetes manifests, the systemd unit and the image,
checked for what would break them: YAML that parses, paths that exist, settings that
bikewatch knows, and the tools' own checks where the tools are installed
(`docker compose config`, `kubectl kustomize`, `systemd-analyze verify`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.config import Settings

DEPLOY = Path(__file__).parents[2] / "deploy"
SETTINGS = {f"BIKEWATCH_{name.upper()}" for name in Settings.__dataclass_fields__}


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\b(BIKEWATCH_[A-Z_]+)\b", text))


class TestCompose:
    def compose(self) -> dict[str, Any]:
        return dict(yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text()))

    def test_the_stack(self) -> None:
        services = self.compose()["services"]
        assert set(services) == {"mosquitto", "postgres", "bikewatch", "prometheus", "grafana"}
        worker = services["bikewatch"]
        assert worker["deploy"]["replicas"] >= 2
        assert "{hostname}" in worker["environment"]["BIKEWATCH_CLIENT_ID"]
        assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert (DEPLOY.parent / worker["build"]["dockerfile"]).is_file()

    def test_every_mounted_file_exists_and_every_setting_is_known(self) -> None:
        compose_dir = DEPLOY / "compose"
        for name, service in self.compose()["services"].items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith(".") and "/secrets/" not in source:
                    assert (compose_dir / source).exists(), (name, source)
        text = (compose_dir / "compose.yaml").read_text() + (compose_dir / "setup.sh").read_text()
        assert _env_names(text) <= SETTINGS, _env_names(text) - SETTINGS
        prom = yaml.safe_load((compose_dir / "prometheus.yml").read_text())
        assert prom["scrape_configs"][0]["dns_sd_configs"][0]["names"] == ["bikewatch"]

    def test_docker_compose_config(self, tmp_path: Path) -> None:
        docker = shutil.which("docker")
        if docker is None or subprocess.run([docker, "compose", "version"],
                                            capture_output=True).returncode != 0:
            pytest.skip("the docker compose client is not installed")
        p = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose" / "compose.yaml"),
                            "config", "--quiet"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr


class TestKubernetes:
    def documents(self) -> dict[str, dict[str, Any]]:
        docs: dict[str, dict[str, Any]] = {}
        for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.stem)}"] = doc
        return docs

    def test_manifests(self) -> None:
        docs = self.documents()
        kust = docs["Kustomization/kustomization"]
        for resource in kust["resources"]:
            assert (DEPLOY / "k8s" / resource).is_file(), resource
        deployment = docs["Deployment/bikewatch"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= SETTINGS
        secret = docs["Secret/bikewatch"]
        for e in env.values():
            if "valueFrom" in e:
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "bikewatch" and ref["key"] in secret["stringData"]
        assert "{hostname}" in env["BIKEWATCH_CLIENT_ID"]["value"]
        assert container["resources"]["requests"]["cpu"]  # the HPA scales on it
        hpa = docs["HorizontalPodAutoscaler/bikewatch"]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": "bikewatch"}
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "emqx" in secret["stringData"]["mqtt-url"] and "EMQX/emqx" in docs

    def test_kubectl_kustomize(self) -> None:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not installed")
        p = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        kinds = [d["kind"] for d in yaml.safe_load_all(p.stdout)]
        assert sorted(kinds) == ["Deployment", "HorizontalPodAutoscaler", "Namespace", "Service"]


class TestSystemd:
    def test_unit_verifies(self, tmp_path: Path) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            pytest.skip("systemd-analyze is not installed")
        unit = (DEPLOY / "systemd" / "bikewatch@.service").read_text()
        assert _env_names(unit) | _env_names(
            (DEPLOY / "systemd" / "bikewatch.env.example").read_text()) <= SETTINGS
        # verify wants the binary and the environment file to exist: point at ours
        bikewatch = shutil.which("bikewatch") or "/bin/true"
        local = unit.replace("/opt/bikewatch/bin/bikewatch", bikewatch).replace(
            "/etc/bikewatch/bikewatch.env", str(DEPLOY / "systemd" / "bikewatch.env.example"))
        (tmp_path / "bikewatch@.service").write_text(local)
        p = subprocess.run([analyze, "verify", str(tmp_path / "bikewatch@1.service")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "bikewatch@" not in p.stderr, p.stderr  # warnings name the unit


def test_the_image_copies_what_exists() -> None:
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), source
