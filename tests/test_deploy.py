"""docker-compose.yml, deploy/k8s/ and deploy/prometheus/, validated offline and checked against what the code reads.

No container engine or cluster runs here: the compose file is checked against the
Compose Specification schema (check-jsonschema) and by Debian's docker-compose
(`config -q`), the manifests by kubernetes-validate, the Prometheus config and alerting
rules by promtool (Debian's prometheus package), which also runs the rules' unit tests;
the rest of the tests hold the files to the code (variables, ports, health checks, metrics).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tools import system_tool

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
OUR_SERVICES = ("transcribe", "analyze", "crm", "ingest")
GRPC = {"transcribe": ("TRANSCRIBE", "callcenter.v1.TranscriptionService"),
        "analyze": ("ANALYZE", "callcenter.v1.AnalysisService"),
        "crm": ("CRM_SYNC", "callcenter.v1.CrmSyncService")}
REQUIRED = {"WEBHOOK_SECRETS": "x", "CRM_URL": "http://crm.example/records", "POSTGRES_PASSWORD": "pw"}


def variables_the_code_reads() -> set[str]:
    """Every upper-case name the services pass to the env helpers, plus the *_LISTEN and *_METRICS_LISTEN names."""
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', text))
        names |= {f"{prefix}{suffix}" for prefix in re.findall(r'GrpcServerSettings\.from_env\("([A-Z_]+)"', text)
                  for suffix in ("_LISTEN", "_METRICS_LISTEN")}
    return names


def compose(*files: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = system_tool("docker-compose", "docker-compose")
    args = [exe, *(a for f in files for a in ("-f", str(f))), "config", "-q"]
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    return subprocess.run(args, cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True)


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def k8s_documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def containers() -> dict[str, dict]:
    out = {}
    for doc in k8s_documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                out[c["name"]] = c
    return out


def env_of(container: str) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in containers()[container].get("env", [])}


def test_compose_file_follows_the_compose_specification() -> None:
    for path in (COMPOSE, ROOT / "docker-compose.gpu.yml"):
        result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_accepts_the_file_and_the_gpu_override() -> None:
    assert compose(COMPOSE, env=REQUIRED).returncode == 0
    result = compose(COMPOSE, ROOT / "docker-compose.gpu.yml", env=REQUIRED)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_start_without_a_required_setting(missing: str) -> None:
    result = compose(COMPOSE, env={k: v for k, v in REQUIRED.items() if k != missing})
    assert result.returncode != 0 and missing in result.stderr


def test_every_variable_compose_sets_for_our_services_is_read_by_the_code() -> None:
    known = variables_the_code_reads()
    services = compose_services()
    for name in (*OUR_SERVICES, "models"):
        env = services[name].get("environment", {})
        unknown = {k for k in env if k not in known and not k.startswith("OTEL_")}
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"


def test_compose_passes_each_service_every_secret_kubernetes_gives_it() -> None:
    services = compose_services()
    for name in OUR_SERVICES:
        from_secrets = {e["name"] for e in containers()[name].get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        missing = from_secrets - set(services[name].get("environment", {}))
        assert not missing, f"compose does not pass {name} {missing}, which Kubernetes gives it from the Secret"


def test_compose_health_checks_and_addresses_match_the_listen_ports() -> None:
    services = compose_services()
    for name, (prefix, grpc_service) in GRPC.items():
        listen_port = services[name]["environment"][f"{prefix}_LISTEN"].rsplit(":", 1)[1]
        check = services[name]["healthcheck"]["test"]
        assert check[1:4] == ["python", "-m", "services.common.healthcheck"]
        assert check[4] == f"127.0.0.1:{listen_port}" and check[5] == grpc_service
        assert services["ingest"]["environment"][f"{prefix}_ADDR"] == f"{name}:{listen_port}"
    ingest = services["ingest"]
    port = ingest["environment"]["INGEST_PORT"]
    assert ingest["ports"] == [f"{port}:{port}"] and f"127.0.0.1:{port}/healthz" in ingest["healthcheck"]["test"][-1]
    assert services["analyze"]["environment"]["OLLAMA_HOST"] == "http://ollama:11434"


def test_compose_runs_the_job_store_and_the_outbox_on_postgres() -> None:
    services = compose_services()
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name in ("ingest", "crm"):
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://callmesh:")
        assert services[name]["environment"]["DATABASE_URL"].endswith("@postgres:5432/callmesh")
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_kubernetes_ingest_and_crm_scale_out_on_the_shared_database() -> None:
    docs = k8s_documents()
    for name in ("ingest", "crm"):
        workload = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        assert workload["spec"]["replicas"] >= 2
        env = {e["name"]: e for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_URL"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "ingest")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment" and hpa["spec"]["maxReplicas"] > 1
    assert any(d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "crm" for d in docs)


def test_kubernetes_ingest_and_crm_mount_the_company_ca_where_the_readme_points_outbound_tls_ca() -> None:
    readme = (ROOT / "README.md").read_text()
    configmap = re.search(r"create configmap (\S+)\s+--from-file=(\S+?)=", readme)
    ca_file = re.search(r"`OUTBOUND_TLS_CA: (\S+)` in `callmesh-config`", readme)
    assert configmap and ca_file
    docs = k8s_documents()
    for name in ("ingest", "crm"):
        pod = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)["spec"]["template"]
        [volume] = [v for v in pod["spec"]["volumes"] if v.get("configMap", {}).get("name") == configmap[1]]
        assert volume["configMap"]["optional"] is True  # without a company CA the pods still start
        [mount] = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] and ca_file[1] == f"{mount['mountPath']}/{configmap[2]}"


def test_kubernetes_manifests_validate_strictly() -> None:
    files = [str(K8S / n) for n in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", *files],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomize_renders_every_manifest_and_the_result_validates(tmp_path: Path) -> None:
    kubectl = system_tool("kubectl", "kubernetes-client")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {(d["kind"], d["metadata"]["name"])
                                                                    for d in k8s_documents()}
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    broken = tmp_path / "analyze.yaml"
    broken.write_text((K8S / "analyze.yaml").read_text().replace("readinessProbe:", "readynessProbe:", 1))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(broken)],
                            capture_output=True, text=True)
    assert result.returncode != 0


def test_kubernetes_probes_use_grpc_health_on_the_listen_port() -> None:
    found = containers()
    for name, (prefix, grpc_service) in GRPC.items():
        c = found[name]
        env = env_of(name)
        port = int(env[f"{prefix}_LISTEN"].rsplit(":", 1)[1])
        assert c["ports"][0]["containerPort"] == port
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": grpc_service}
        assert c["livenessProbe"]["grpc"]["port"] == port
        assert c["resources"]["requests"]


def test_kubernetes_services_for_grpc_are_headless_and_ingest_balances_over_dns() -> None:
    docs = k8s_documents()
    grpc_services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] in GRPC}
    assert set(grpc_services) == set(GRPC)
    assert all(d["spec"]["clusterIP"] == "None" for d in grpc_services.values())
    env = env_of("ingest")
    for name, (prefix, _) in GRPC.items():
        assert env[f"{prefix}_ADDR"].startswith(f"dns:///{name}.")
    known = variables_the_code_reads()
    for c in containers().values():
        if c["name"] not in ("ollama", "postgres"):
            assert {e["name"] for e in c.get("env", [])} <= known


def test_kubernetes_has_a_gpu_for_transcribe_autoscaling_and_disruption_budgets() -> None:
    docs = k8s_documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    transcribe = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "transcribe")
    spec = transcribe["spec"]["template"]["spec"]
    assert spec["nodeSelector"] and spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {("HorizontalPodAutoscaler", "ingest"), ("HorizontalPodAutoscaler", "analyze")} <= kinds
    assert {("PodDisruptionBudget", n) for n in ("transcribe", "analyze", "ingest")} <= kinds
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert {"WEBHOOK_SECRETS", "API_TOKEN", "CRM_URL", "DATABASE_URL"} <= set(secret["stringData"])


def metric_families_the_code_defines() -> set[str]:
    """Prometheus family names of the instruments the services create (dots → underscores, unit suffixes)."""
    families: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        for kind, name, rest in re.findall(
                r'create_(counter|observable_counter|histogram|observable_gauge)\(\s*"([a-z_.]+)"([^)]*)', text):
            base = name.replace(".", "_") + ("_seconds" if 'unit="s"' in rest else "")
            families.add(base + "_total" if kind.endswith("counter") else base)
        # services.common.metrics.outcome_counter(meter_name, "name", description): a counter too
        families |= {name.replace(".", "_") + "_total" for name in
                     re.findall(r'outcome_counter\([^,()]+,\s*"([a-z_.]+)"', text)}
    return families


def test_grafana_dashboard_only_plots_metrics_the_services_export() -> None:
    import json

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "callmesh-dashboard.json").read_text())
    defined = metric_families_the_code_defines()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= {m.removesuffix("_bucket").removesuffix("_count") for m in
                     re.findall(r"\b(callmesh_[a-z_]+)", target["expr"])}
    assert used and used <= defined, used - defined
    assert len(used) >= 10


def test_the_gpu_image_brings_the_cublas_that_ctranslate2_loads() -> None:
    """CTranslate2 names the cuBLAS it opens at its first matrix product; the NVIDIA runtime brings only
    the driver, so the GPU build installs that major version and puts its folder on LD_LIBRARY_PATH."""
    import mmap

    import ctranslate2

    library = next((Path(ctranslate2.__file__).parents[1] / "ctranslate2.libs").glob("libctranslate2*.so*"))
    with library.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        major = re.search(rb"libcublas\.so\.(\d+)", data).group(1).decode()
    assert re.search(rf"^nvidia-cublas-cu{major}==", (ROOT / "requirements-gpu.txt").read_text(), re.M)
    dockerfile = (ROOT / "services" / "transcribe" / "Dockerfile").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    assert f"LD_LIBRARY_PATH=/opt/venv/lib/python{python}/site-packages/nvidia/cublas/lib" in dockerfile
    assert 'if [ "$WHISPER_GPU" = 1 ]; then /opt/venv/bin/pip install --no-cache-dir -r requirements-gpu.txt' in dockerfile
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["transcribe"]
    assert gpu["build"]["args"]["WHISPER_GPU"] == "1"
    assert gpu["image"] != compose_services()["transcribe"]["image"]
    assert containers()["transcribe"]["image"] == gpu["image"]  # the Kubernetes transcribe runs on a GPU node


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([system_tool("promtool", "prometheus"), *args], cwd=PROMETHEUS, capture_output=True, text=True)


def alerting_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "callmesh-alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_prometheus_config_and_its_alerting_rules_are_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alerting_rules())} rules found" in result.stdout


def test_each_alert_fires_as_its_unit_tests_say() -> None:
    result = promtool("test", "rules", "callmesh-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS / "callmesh-alerts.test.yml").read_text())["tests"]
    fired = {check["alertname"] for test in tests for check in test["alert_rule_test"] if check["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alerting_rules()}  # none untested


def test_alerts_only_use_metrics_the_services_export() -> None:
    used = {m.removesuffix("_bucket").removesuffix("_count") for rule in alerting_rules()
            for m in re.findall(r"\b(callmesh_[a-z_]+)", rule["expr"])}
    defined = metric_families_the_code_defines()
    assert used and used <= defined, used - defined


def test_every_alert_names_a_row_of_the_readme_runbook() -> None:
    readme = (ROOT / "README.md").read_text()
    runbook = readme.split("### Runbook", 1)[1].split("\n#", 1)[0]
    symptoms = [line.split("|")[1].strip() for line in runbook.splitlines() if line.startswith("| ")]
    for rule in alerting_rules():
        assert any(symptom.startswith(rule["annotations"]["runbook"]) for symptom in symptoms), rule["alert"]
        assert rule["alert"] in runbook  # the row names the alert that sends people there


def test_prometheus_scrapes_each_service_where_compose_serves_its_metrics() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {job["job_name"].removeprefix("callmesh-"): job["static_configs"][0]["targets"][0]
               for job in config["scrape_configs"]}
    services = compose_services()
    for name, prefix in (("ingest", "INGEST"), *((name, prefix) for name, (prefix, _) in GRPC.items())):
        assert targets[name] == f"{name}:{services[name]['environment'][f'{prefix}_METRICS_LISTEN'].rsplit(':', 1)[1]}"
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


OUTSIDE = None  # a pod in another namespace of the cluster (Prometheus, another internal system)


@functools.cache
def workloads() -> dict[str, dict]:
    """Pod templates of the Deployments and StatefulSets, by workload name."""
    return {d["metadata"]["name"]: d["spec"]["template"] for d in k8s_documents()
            if d["kind"] in ("Deployment", "StatefulSet")}


def network_policies() -> list[dict]:
    return [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def port_numbers(workload: str) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in workloads()[workload]["spec"]["containers"] for p in c.get("ports", [])}


def peer_matches(peer: dict, source: str | None) -> bool:
    """Whether a NetworkPolicy peer is a pod of workload ``source`` in this namespace (None: another namespace)."""
    if "ipBlock" in peer or peer.get("namespaceSelector"):
        return False  # addresses, or namespaces chosen by their labels: none of these manifests' pods
    if "podSelector" not in peer:
        return True  # namespaceSelector {} alone: any pod of the cluster
    return source is not OUTSIDE and selects(peer["podSelector"], workloads()[source]["metadata"]["labels"])


def ingress_allowed(source: str | None, target: str, port: int) -> bool:
    """Whether the policies let ``source``'s pods reach ``target``'s pods on ``port``."""
    labels = workloads()[target]["metadata"]["labels"]
    numbers = port_numbers(target)
    governing = [p for p in network_policies()
                 if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)]
    assert governing, f"no policy governs {target}"
    for policy in governing:
        for rule in policy["spec"].get("ingress", []):
            ports = [numbers.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            if "from" not in rule or any(peer_matches(peer, source) for peer in rule["from"]):
                return True
    return False


def test_every_network_policy_selects_pods_and_names_ports_they_have() -> None:
    for policy in network_policies():
        spec = policy["spec"]
        chosen = [w for w, pod in workloads().items() if selects(spec["podSelector"], pod["metadata"]["labels"])]
        assert chosen, policy["metadata"]["name"]
        for rule in spec.get("ingress", []):
            for port in rule.get("ports", []):
                assert all(isinstance(port["port"], int) or port["port"] in port_numbers(w) for w in chosen), port
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(selects(peer["podSelector"], pod["metadata"]["labels"]) for pod in workloads().values())


def test_the_network_policies_let_each_service_reach_what_it_calls() -> None:
    ingest = env_of("ingest")
    for name, (prefix, _) in GRPC.items():
        assert ingress_allowed("ingest", name, int(ingest[f"{prefix}_ADDR"].rsplit(":", 1)[1])), name
    assert ingress_allowed("ingest", "postgres", 5432) and ingress_allowed("crm", "postgres", 5432)
    assert ingress_allowed("analyze", "ollama", int(env_of("analyze")["OLLAMA_HOST"].rsplit(":", 1)[1]))
    assert ingress_allowed(OUTSIDE, "ingest", port_numbers("ingest")["http"])  # recorders, operators
    assert ingress_allowed(OUTSIDE, "transcribe", port_numbers("transcribe")["grpc"])  # other internal systems
    for name in ("ingest", "transcribe", "analyze", "crm"):  # Prometheus, from its own namespace
        port = int(workloads()[name]["metadata"]["annotations"]["prometheus.io/port"])
        assert ingress_allowed(OUTSIDE, name, port), name


def test_only_ingest_reaches_analyze_and_crm_and_only_ingest_and_crm_the_database() -> None:
    for target in ("analyze", "crm"):
        grpc_port = port_numbers(target)["grpc"]
        assert not ingress_allowed(OUTSIDE, target, grpc_port)
        assert not ingress_allowed("transcribe", target, grpc_port)
    for source in (OUTSIDE, "transcribe", "analyze"):
        assert not ingress_allowed(source, "postgres", 5432)
    assert not ingress_allowed(OUTSIDE, "ollama", 11434) and not ingress_allowed("ingest", "ollama", 11434)


def test_analyze_reaches_only_ollama_dns_and_the_trace_collector() -> None:
    analyze = workloads()["analyze"]["metadata"]["labels"]
    [policy] = [p for p in network_policies()
                if selects(p["spec"]["podSelector"], analyze) and "Egress" in p["spec"]["policyTypes"]]
    rules = policy["spec"]["egress"]
    assert all("ipBlock" not in peer for rule in rules for peer in rule["to"])  # nothing outside the cluster
    ollama = next(r for r in rules if any("podSelector" in peer and selects(
        peer["podSelector"], workloads()["ollama"]["metadata"]["labels"]) for peer in r["to"]))
    assert [p["port"] for p in ollama["ports"]] == [int(env_of("analyze")["OLLAMA_HOST"].rsplit(":", 1)[1])]
    config = next(d for d in k8s_documents() if d["kind"] == "ConfigMap")["data"]
    collector = config["OTEL_EXPORTER_OTLP_ENDPOINT"].split("//", 1)[1]  # host.namespace:port
    host, port = collector.rsplit(":", 1)
    otlp = next(r for r in rules if any(peer.get("namespaceSelector") for peer in r["to"]))
    assert otlp["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == host.split(".")[1]
    assert [p["port"] for p in otlp["ports"]] == [int(port)]


def compose_networks(service: str) -> set[str]:
    return set(compose_services()[service].get("networks", ["default"]))


def internal_networks() -> set[str]:
    return {name for name, net in yaml.safe_load(COMPOSE.read_text())["networks"].items() if (net or {}).get("internal")}


def host_of(address: str) -> str:
    """``transcribe:50051``, ``http://ollama:11434``, ``postgresql://u:p@postgres:5432/db`` → the host."""
    return re.sub(r"^[a-z]+://", "", address).rsplit("@", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]


def test_compose_keeps_transcribe_and_analyze_on_a_network_with_no_way_out() -> None:
    assert internal_networks()
    for name in ("transcribe", "analyze"):
        assert compose_networks(name) <= internal_networks(), name


def test_compose_puts_each_service_on_a_network_with_what_it_calls() -> None:
    services = compose_services()
    env = {name: svc.get("environment", {}) for name, svc in services.items()}
    calls = [("ingest", host_of(env["ingest"][f"{prefix}_ADDR"])) for prefix, _ in GRPC.values()]
    calls += [(name, host_of(env[name]["DATABASE_URL"])) for name in ("ingest", "crm")]
    calls += [(name, host_of(env[name]["OLLAMA_HOST"])) for name in ("analyze", "ollama-pull")]
    calls += [(name, host_of(env[name]["OTEL_EXPORTER_OTLP_ENDPOINT"])) for name in OUR_SERVICES]
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    calls += [("prometheus", host_of(job["static_configs"][0]["targets"][0])) for job in scrape]
    [datasource] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "callmesh.yml").read_text())["datasources"]
    calls.append(("grafana", host_of(datasource["url"])))
    assert len(calls) == 16
    for caller, callee in calls:
        assert compose_networks(caller) & compose_networks(callee), f"{caller} cannot reach {callee}"


def test_compose_gives_a_way_out_to_what_downloads_posts_or_publishes_a_port() -> None:
    services = compose_services()
    needs_out = {"ingest", "crm", "models", "ollama"} | {name for name, svc in services.items() if svc.get("ports")}
    for name in needs_out:
        assert compose_networks(name) - internal_networks(), name


def test_compose_grafana_shows_the_dashboard_from_the_prometheus_that_scrapes_callmesh() -> None:
    grafana = compose_services()["grafana"]
    mounts = dict(volume.removesuffix(":ro").split(":", 1) for volume in grafana["volumes"])
    assert all((ROOT / source).exists() for source in mounts)
    provisioning = ROOT / next(source for source, target in mounts.items() if target == "/etc/grafana/provisioning")
    [provider] = yaml.safe_load((provisioning / "dashboards" / "callmesh.yml").read_text())["providers"]
    dashboard = next(source for source in mounts if source.endswith("callmesh-dashboard.json"))
    assert Path(mounts[dashboard]).parent == Path(provider["options"]["path"])
    [datasource] = yaml.safe_load((provisioning / "datasources" / "callmesh.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]  # the dashboard's ${datasource} default
    prometheus_port = compose_services()["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
