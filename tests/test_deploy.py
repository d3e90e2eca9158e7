"""Deployment files: valid for their tools, and querying only metrics the server really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modserve.config import ServeConfig
from tests.conftest import REPO
from tests.serving import demo_config, running_server

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: no schema ships with the validator
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def tool(name: str) -> str:
    """A CLI from PATH, this interpreter's bin (pip-installed tools), or .tools/bin (`make tools`)."""
    places = [Path(sys.executable).parent, REPO / ".tools" / "bin"]
    found = shutil.which(name) or next(filter(None, (shutil.which(name, path=str(p)) for p in places)), None)
    if found is None:
        pytest.skip(f"{name} not found (`make tools` fetches promtool; hadolint comes with the dev extra)")
    return found


def manifests(directory: Path) -> list[dict]:
    docs = []
    for file in sorted(directory.glob("*.yaml")):
        if file.name in ("kustomization.yaml", "serve.yaml"):
            continue
        docs += [d for d in yaml.safe_load_all(file.read_text()) if d]
    return docs


def rendered(overlay: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) not found")
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("directory", ["base", "overlays/tensor-parallel"])
def test_kubernetes_manifests_validate_against_the_schemas(directory):
    import kubernetes_validate

    docs = rendered(K8S / directory)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", *OPERATOR_KINDS}
    for doc in docs:
        if doc["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    for doc in manifests(K8S / "base"):  # the raw files too, not only what kustomize makes of them
        if doc["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", ["base", "overlays/tensor-parallel"])
def test_the_deployment_probes_drains_and_config_fit_the_server(directory):
    docs = {d["kind"]: d for d in rendered(K8S / directory)}
    serve_yaml = yaml.safe_load(docs["ConfigMap"]["data"]["serve.yaml"])
    config = ServeConfig.model_validate(serve_yaml)  # the shipped config is one modserve accepts
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room for a model load
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == config.engine.vllm.get("tensor_parallel_size", 1)
    assert container["ports"][0]["containerPort"] == config.server.port
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["MODSERVE_SERVER_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True
    monitor, service = docs["ServiceMonitor"], docs["Service"]
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_the_operator_rules_are_the_prometheus_rules():
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


def test_promtool_accepts_the_rules_and_config_and_their_unit_tests():
    promtool = tool("promtool")
    prometheus = DEPLOY / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([promtool, *args], cwd=prometheus, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_like_the_makefile():
    """The image cannot be built here: its install steps are pinned to what CI runs instead."""
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert f"pip install {torch_pin} && pip install ." in dockerfile  # CPU variant: torch first, then us
    assert "$(BIN)/pip install --quiet $(TORCH)" in makefile and "$(BIN)/pip install --quiet -e ." in makefile
    assert 'pip install ".[vllm]"' in dockerfile  # GPU variant: the extra pyproject.toml defines
    assert "vllm" in yaml.safe_dump(load_pyproject()["project"]["optional-dependencies"]["vllm"])
    assert re.search(r"^USER 10001$", dockerfile, re.M) and "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert 'ENTRYPOINT ["modserve", "serve"]' in dockerfile


def load_pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_grafana_dashboard_imports_as_is():
    dashboard = json.loads((DEPLOY / "grafana" / "modserve.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
        assert all(t["expr"] for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "errors", "first token", "inter-token", "tokens", "swaps", "tier", "queue", "detection"):
        assert topic in titles


# --- every metric the dashboard, the rules and the autoscaler use is one the server exposes ----

PROMQL_NAME = re.compile(r"\b(modserve_[a-z0-9_]+)\b")


def referenced_metrics() -> dict[str, set[str]]:
    sources = {
        "grafana": [t["expr"] for p in json.loads((DEPLOY / "grafana" / "modserve.json").read_text())["panels"] for t in p["targets"]],
        "rules": [r["expr"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]],
        "hpa": [yaml.safe_load((K8S / "base" / "hpa.yaml").read_text())["spec"]["metrics"][0]["pods"]["metric"]["name"]],
    }
    return {where: {name for expr in exprs for name in PROMQL_NAME.findall(expr)} for where, exprs in sources.items()}


def exposed_sample_names(metrics_text: str) -> set[str]:
    """Every sample name a family can produce, whether or not it has samples yet."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


def test_dashboards_rules_and_autoscaler_query_only_exposed_metrics(demo):
    with running_server(demo_config(demo)) as server:
        httpx.post(f"{server.base_url}/chat/completions", json={"model": "modserve", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "Habari ya asubuhi"}]}).raise_for_status()
        exposed = exposed_sample_names(httpx.get(f"{server.url}/metrics").text)
    for where, names in referenced_metrics().items():
        assert names, where
        assert names <= exposed, f"{where} queries metrics the server does not expose: {sorted(names - exposed)}"
    design = {"modserve_requests_total", "modserve_time_to_first_token_seconds_bucket", "modserve_pack_swaps_total",
              "modserve_packs_resident", "modserve_waiting_requests", "modserve_language_detections_total",
              "modserve_batch_languages_bucket", "modserve_pack_loads_total", "modserve_inter_token_latency_seconds_bucket"}
    assert design <= set().union(*referenced_metrics().values())
