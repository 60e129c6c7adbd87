"""The deploy files under deploy/ and the Dockerfile, checked without a cluster or a container
engine: Kubernetes manifests (kubernetes-validate, a vendored CRD schema), the compose file (the
Compose Specification schema), the systemd unit (systemd-analyze), the alert rules (promtool) and
the dashboard; each query is checked against the collector's own metrics registry, and the
collector configs they carry are validated by the collector itself."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from collector.app import load_plugins
from collector.config import AppConfig, load_config
from collector.metrics import Metrics
from collector.server import make_app, serving
from tests.e2e import REPO
from tests.metrics_helpers import series_names

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SCHEMAS = REPO / "tests" / "fixtures" / "schemas"
DOCKERFILE = REPO / "Dockerfile"
OPS_PORT_ENV = "ZENCODER_COLLECTOR_OPS_PORT"
IN_CI = os.environ.get("CI") == "true"


def tool(name: str, package: str) -> str:
    """The path of a command-line tool; in CI a missing tool fails the test instead of skipping."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes as (file name, object)."""
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                yield path.name, document


def manifest(kind: str) -> dict[str, Any]:
    (found,) = (doc for _, doc in manifests() if doc["kind"] == kind)
    return found


def collector_config(path: Path, tmp_path: Path, secrets: dict[str, str]) -> AppConfig:
    """Load a collector config the way the daemon does, with these secret files in $SECRETS_DIR
    and the ops port the image sets."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for name, value in secrets.items():
        (secrets_dir / name).write_text(value, encoding="utf-8")
    environ = {"SECRETS_DIR": str(secrets_dir), OPS_PORT_ENV: "9464"}
    types = load_plugins().registry.config_types()
    return load_config(path, environ=environ, sink_types=types)


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "obj"), list(manifests()), ids=[f"{n}:{d['kind']}" for n, d in manifests()]
)
def test_kubernetes_manifest_is_valid(name: str, obj: dict[str, Any]) -> None:
    """Each manifest validates strictly (no unknown field) against the latest Kubernetes API
    schemas; the ServiceMonitor and PrometheusRule (Prometheus Operator CRDs) against their
    vendored CRD schemas."""
    if obj["apiVersion"] == "monitoring.coreos.com/v1":
        crd = SCHEMAS / f"{obj['kind'].lower()}_v1.json"
        # Not jsonschema.validate: its check of the schema itself compiles every pattern, and
        # the CRD's are Go (RE2) expressions, one of which ("^(?i)...") Python rejects.
        jsonschema.Draft202012Validator(json.loads(crd.read_text(encoding="utf-8"))).validate(obj)
    else:
        version = kubernetes_validate.latest_version()
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_has_every_required_kind_and_kustomization_lists_every_file() -> None:
    """Deployment, ConfigMap, Secret, Service, ServiceMonitor and PodDisruptionBudget are there,
    and `kubectl apply -k` applies every manifest file."""
    kinds = {doc["kind"] for _, doc in manifests()}
    required = {"Deployment", "ConfigMap", "Secret", "Service", "ServiceMonitor"}
    assert required | {"PodDisruptionBudget"} <= kinds
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text("utf-8"))
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_kubernetes_objects_select_the_collector_pods_on_the_ops_port() -> None:
    """The Service, ServiceMonitor and PodDisruptionBudget select the Deployment's pod labels;
    probes, Service and ServiceMonitor all use the port named ops, the container's
    ZENCODER_COLLECTOR_OPS_PORT."""
    deployment = manifest("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (port,) = container["ports"]
    assert port == {"name": "ops", "containerPort": int(env[OPS_PORT_ENV]), "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    service = manifest("Service")
    assert service["spec"]["selector"] == pod_labels
    assert service["spec"]["ports"][0]["targetPort"] == "ops"
    monitor = manifest("ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    budget = manifest("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == pod_labels
    assert deployment["spec"]["selector"]["matchLabels"] == pod_labels


def test_deployment_runs_one_replica_until_replicas_can_share_state() -> None:
    """One replica, replaced with Recreate (never two daemons on one state database), as a
    non-root user on a read-only root filesystem, and given more time to stop than its drain."""
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > int(env["ZENCODER_COLLECTOR_SHUTDOWN_GRACE"])


def test_configmap_config_validates_with_the_secret_keys_as_files(tmp_path: Path) -> None:
    """The ConfigMap's config.yaml is a valid collector config when the Secret's keys are the
    files in $SECRETS_DIR, and listens on the ops port for the probes."""
    path = tmp_path / "config.yaml"
    path.write_text(manifest("ConfigMap")["data"]["config.yaml"], encoding="utf-8")
    secrets = {key: f"{key}-value" for key in manifest("Secret")["stringData"]}
    config = collector_config(path, tmp_path, secrets)
    assert config.server.listen == "0.0.0.0:9464"
    assert config.state.url.startswith("postgresql+psycopg://")
    assert config.tenants


# --- docker compose -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text("utf-8"))
    return loaded


def test_compose_file_matches_the_compose_specification() -> None:
    """deploy/docker-compose.yml validates against the Compose Specification JSON schema."""
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema).validate(compose())


def test_compose_runs_collector_postgres_prometheus_and_grafana_with_their_files() -> None:
    """The stack has the four services, and every config file it mounts exists."""
    spec = compose()
    assert {"collector", "postgres", "prometheus", "grafana"} <= set(spec["services"])
    for name, config in spec["configs"].items():
        assert (DEPLOY / config["file"]).is_file(), name
    assert spec["services"]["collector"]["command"] == ["run"]


def test_compose_collector_config_validates(tmp_path: Path) -> None:
    """deploy/compose/collector.yaml is a valid collector config with the compose secret as a
    file, keeps its state in the postgres service and listens where Prometheus scrapes."""
    config = collector_config(
        DEPLOY / "compose" / "collector.yaml", tmp_path, {"postgres_password": "pw"}
    )
    assert config.state.url.startswith("postgresql+psycopg://collector@postgres:5432/")
    assert config.server.listen == "0.0.0.0:9464"
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text("utf-8"))
    (scrape,) = prometheus["scrape_configs"]
    assert scrape["static_configs"][0]["targets"] == ["collector:9464"]


def test_compose_prometheus_config_passes_promtool() -> None:
    """`promtool check config` accepts the compose stack's Prometheus configuration."""
    promtool = tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(DEPLOY / "compose" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd --------------------------------------------------------------------------------


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a warning (ExecStart pointed at this
    environment's real zencoder-collector, since verify checks that it exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (DEPLOY / "systemd" / "zencoder-collector.service").read_text(encoding="utf-8")
    installed = Path(sys.executable).parent / "zencoder-collector"
    assert "/opt/zencoder-collector/bin/zencoder-collector" in unit
    local = tmp_path / "zencoder-collector.service"
    local.write_text(
        unit.replace("/opt/zencoder-collector/bin/zencoder-collector", str(installed)), "utf-8"
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(local)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


# --- alert rules and dashboard ----------------------------------------------------------------

_GRAFANA_INTERVAL = re.compile(r"\$__(rate_)?interval|\$\{__(rate_)?interval\}")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*\w+\)$")


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL query selects (Grafana variables replaced first)."""
    query = _GRAFANA_INTERVAL.sub("5m", query)
    query = _GRAFANA_VARIABLE.sub(".*", query)
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {query!r}"
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(query), visit)
    return names


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text("utf-8"))
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "zencoder-collector.json").read_text(encoding="utf-8")
    )
    return loaded


def dashboard_queries() -> list[str]:
    """Every panel query and every query variable's metric selector."""
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, variable["query"]
            queries.append(match.group(1))
    return queries


def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml."""
    promtool = tool("promtool", "prometheus")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules` passes, and every alert has at least one unit test."""
    promtool = tool("promtool", "prometheus")
    tests_file = DEPLOY / "prometheus" / "alerts.test.yml"
    result = subprocess.run(
        [promtool, "test", "rules", str(tests_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(tests_file.read_text(encoding="utf-8"))
    tested = {case["alertname"] for test in spec["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_prometheusrule_carries_the_same_groups_as_alerts_yml() -> None:
    """The Kubernetes PrometheusRule and deploy/prometheus/alerts.yml hold identical rules, so
    the promtool tests cover both."""
    loaded = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text("utf-8"))
    assert manifest("PrometheusRule")["spec"]["groups"] == loaded["groups"]


def test_alerts_cover_staleness_dead_letters_sinks_and_auth() -> None:
    """The four alerts the operators asked for exist (plus the daemon being down and a failing
    state store)."""
    assert {rule["alert"] for rule in alert_rules()} == {
        "ZencoderCollectorDown",
        "ZencoderTenantStale",
        "ZencoderDeadLettersGrowing",
        "ZencoderSinkDown",
        "ZencoderTenantAuthFailed",
        "ZencoderStateStoreFailing",
    }


def test_every_alert_and_dashboard_query_names_an_exported_metric() -> None:
    """Each metric in an alert expression or a dashboard query (panels and variables) is a
    series the collector's registry exports, so a renamed metric breaks this test, not a
    dashboard in production."""
    exported = series_names(Metrics())
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    used: set[str] = set()
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        unknown = names - exported
        assert not unknown, f"{sorted(unknown)} in {query!r} is not exported by the collector"
        used |= names
    # The dashboard shows every tenant and sink family the operators asked for.
    for family in (
        "zencoder_collector_last_success_timestamp_seconds",
        "zencoder_collector_sink_backlog",
        "zencoder_collector_sink_dead_letters",
        "zencoder_collector_api_requests_total",
        "zencoder_collector_usage_active_users",
    ):
        assert family in used


def test_metric_name_extraction_sees_every_selector() -> None:
    """The PromQL walk finds names inside functions, aggregations, binary operators and ranges,
    with Grafana variables in matchers and ranges."""
    query = (
        'sum by (tenant) (rate(a_total{tenant=~"$tenant"}[$__rate_interval])) '
        "/ on (tenant) group_left () b > 2 * c"
    )
    assert metric_names(query) == {"a_total", "b", "c"}


def test_dashboard_sections_and_datasource_variable() -> None:
    """The dashboard has a stable uid, the five sections, and every panel reads the datasource
    chosen in its variable."""
    board = dashboard()
    assert board["uid"] == "zencoder-collector"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    for section in ("Collection health", "freshness", "Sinks", "API", "Usage per tenant"):
        assert any(section in row for row in rows), section
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    """No two panels share a cell of Grafana's 24-column grid."""
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_image_base_is_pinned_by_digest() -> None:
    """The one FROM names python:3.11-slim by its sha256 digest."""
    (base,) = [args for name, args in dockerfile_instructions() if name == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), base


def test_image_default_command_is_the_demo() -> None:
    """Without arguments the image runs `zencoder-collector demo`, which needs no mounted
    config (tests/test_packaging.py runs it outside the repository)."""
    instructions = dict(dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["zencoder-collector"]
    assert json.loads(instructions["CMD"]) == ["demo"]


def healthcheck_command() -> list[str]:
    instructions = dict(dockerfile_instructions())
    command = instructions["HEALTHCHECK"].split(" CMD ", 1)[1]
    parsed: list[str] = json.loads(command)
    return parsed


async def test_healthcheck_reads_the_ops_port_setting_the_server_listens_on() -> None:
    """The image sets ZENCODER_COLLECTOR_OPS_PORT, EXPOSEs it, and its HEALTHCHECK command
    succeeds against a real ops server on the port that variable names and fails without one."""
    instructions = dockerfile_instructions()
    env = " ".join(args for name, args in instructions if name == "ENV")
    assert re.search(rf"\b{OPS_PORT_ENV}=9464\b", env)
    assert ("EXPOSE", f"${{{OPS_PORT_ENV}}}") in instructions
    command = healthcheck_command()
    assert command[0] == "python"

    async def status() -> dict[str, Any]:
        return {}

    async def ready() -> str | None:
        return None

    app = make_app(Metrics(), status, ready)
    async with serving(app, "127.0.0.1:0") as where:
        port = where.rpartition(":")[2]
        healthy = await asyncio.create_subprocess_exec(
            sys.executable, *command[1:], env={**os.environ, OPS_PORT_ENV: port}
        )
        assert await healthy.wait() == 0
    stopped = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env={**os.environ, OPS_PORT_ENV: port},
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await stopped.wait() != 0


def test_deploy_configs_listen_on_the_images_ops_port_variable() -> None:
    """The collector configs under deploy/ take the ops port from ZENCODER_COLLECTOR_OPS_PORT,
    the variable the image's HEALTHCHECK reads."""
    compose_config = (DEPLOY / "compose" / "collector.yaml").read_text(encoding="utf-8")
    assert f"listen: 0.0.0.0:${{{OPS_PORT_ENV}" in compose_config
    assert f"listen: 0.0.0.0:${{{OPS_PORT_ENV}" in manifest("ConfigMap")["data"]["config.yaml"]
