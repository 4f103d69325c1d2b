"""The Helm chart, rendered by a real Helm engine for several value sets: every object valid against the
Kubernetes schemas, the ConfigMap loaded by kvtier's own config loader, every file the config names mounted,
and invalid values refused with a message naming the value."""

from __future__ import annotations

import copy

import pytest
import yaml

from cluster.config import KvtierConfig, load_config
from tests.helm.k8s import CHART, ChartRenderError, render, validate

EXTERNAL_REDIS_CLUSTER = {
    "redis": {"mode": "external", "external": {"url": "rediss://redis-0.redis.cache:6379/0", "cluster": True,
                                               "clusterNodes": ["redis-1.redis.cache:6379", "redis-2.redis.cache:6379"],
                                               "caSecretName": "redis-ca"},
              "auth": {"existingSecret": "redis-auth", "username": "kvtier"}},
}
TP2_FOUR_WORKERS = {
    "workers": {"replicas": 4, "tensorParallelSize": 2, "nodeSelector": {"gpu": "h100"}},
    "model": {"name": "/models/llama3-8b", "dtype": "bfloat16", "maxModelLen": 32768},
    "engine": {"kvCacheMemory": "0.9"},
}
TLS_AND_AUTH = {
    "router": {"tls": {"enabled": True, "secretName": "kvtier-tls", "requireClientCert": True},
               "auth": {"enabled": True, "secretName": "kvtier-tokens"}},
    "ray": {"auth": {"enabled": True, "secretName": "ray-token"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
}
VALUE_SETS = {"default": {}, "external-redis-cluster": EXTERNAL_REDIS_CLUSTER, "tp2-four-workers": TP2_FOUR_WORKERS,
              "tls-and-auth": TLS_AND_AUTH}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def loaded_config(objects: list[dict], tmp_path) -> KvtierConfig:
    (config_map,) = by_kind(objects, "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return load_config(path)


def containers(raycluster: dict) -> dict[str, tuple[dict, dict]]:
    """'head' and each worker group -> (its container, its pod spec)."""
    spec = raycluster["spec"]
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    groups = {"head": (head_pod["containers"][0], head_pod)}
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        groups[group["groupName"]] = (pod["containers"][0], pod)
    return groups


def config_files(config: KvtierConfig) -> dict[str, str | None]:
    router, redis = config.router, config.kvstore.redis
    return {"tls.cert": router.tls.cert_file, "tls.key": router.tls.key_file, "tls.ca": router.tls.client_ca_file,
            "tokens": router.auth.tokens_file, "redis.password": redis.password_file, "redis.ca": redis.ca_file}


def assert_mounted(path: str, container: dict, pod: dict) -> None:
    """``path`` lies under one of the container's mounts, whose volume exists in the pod and names that file."""
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is not under any mount of {container['name']}"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    file_name = path[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
    source = volume.get("secret") or volume.get("configMap")
    if "items" in source:
        assert file_name in [item["path"] for item in source["items"]]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes(name):
    objects = render(VALUE_SETS[name])
    assert {"RayCluster", "ConfigMap", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= {o["kind"] for o in objects}
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_the_configmap_loads_with_kvtiers_loader_and_its_files_are_mounted(name, tmp_path):
    objects = render(VALUE_SETS[name])
    config = loaded_config(objects, tmp_path)
    (raycluster,) = by_kind(objects, "RayCluster")
    groups = containers(raycluster)
    assert "--config /etc/kvtier/config/config.yaml" in groups["head"][0]["args"][0]
    for key, path in config_files(config).items():
        if path is None:
            continue
        assert_mounted(path, *groups["head"])
        if key.startswith("redis."):  # workers open Redis themselves
            assert_mounted(path, *groups["gpu-workers"])


def test_default_values_give_a_bundled_redis_with_auth_and_gpu_workers(tmp_path):
    objects = render({})
    config = loaded_config(objects, tmp_path)
    assert config.kvstore.redis.url == "redis://kv-kvtier-redis:6379/0"
    assert config.kvstore.redis.password_file == "/etc/kvtier/redis-auth/password"
    assert (config.workers.count, config.workers.num_gpus, config.workers.host) == (2, 1, "node_ip")
    assert config.ray.address == "auto" and config.router.host == "0.0.0.0" and config.ray.auth == "token"
    (statefulset,) = by_kind(objects, "StatefulSet")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (secret,) = by_kind(objects, "Secret")
    assert secret["metadata"]["name"] == "kv-kvtier-redis" and secret["data"]["password"]
    (raycluster,) = by_kind(objects, "RayCluster")
    assert raycluster["spec"]["authOptions"] == {"mode": "token"}


def test_redis_reads_timeouts_write_queue_and_io_threads_are_set_from_values(tmp_path):
    default = render({})
    assert "--io-threads" not in by_kind(default, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    redis = loaded_config(default, tmp_path).kvstore.redis
    assert (redis.read_parallelism, redis.prefetch_threads, redis.max_connections) == (1, 2, 8)
    assert (redis.staging_memory, redis.compute_while_reading) == ("1GiB", "auto")
    assert (redis.socket_timeout_s, redis.connect_timeout_s, redis.write_queue_blocks) == (0.25, 0.25, 4096)
    assert redis.refresh_s == 60
    tuned = render({"redis": {"refreshSeconds": 7.5, "readParallelism": 12, "prefetchThreads": 3, "stagingMemory": "6GiB",
                              "computeWhileReading": "off", "bundled": {"ioThreads": 4}, "socketTimeoutSeconds": 2,
                              "connectTimeoutSeconds": 0.5, "writeQueueBlocks": 16384}})
    args = by_kind(tuned, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--io-threads") + 1] == "4" and args[args.index("--io-threads-do-reads") + 1] == "yes"
    (tmp_path / "tuned").mkdir()
    redis = loaded_config(tuned, tmp_path / "tuned").kvstore.redis
    assert (redis.read_parallelism, redis.prefetch_threads, redis.max_connections) == (12, 3, 37)
    assert redis.staging_memory == "6GiB"
    assert redis.compute_while_reading == "off"
    assert (redis.socket_timeout_s, redis.connect_timeout_s, redis.write_queue_blocks) == (2, 0.5, 16384)
    assert redis.refresh_s == 7.5


def test_engine_and_router_timeouts_are_set_from_values_and_the_head_outlives_its_drain(tmp_path):
    default = loaded_config(render({}), tmp_path)
    assert (default.engine.collective_timeout_s, default.engine.rank_start_timeout_s) == (60, 600)
    assert (default.router.stall_timeout_s, default.router.drain_timeout_s) == (30, 60)
    tuned = render({"engine": {"collectiveTimeoutSeconds": 120, "rankStartTimeoutSeconds": 1800.5},
                    "router": {"stallTimeoutSeconds": 300, "drainTimeoutSeconds": 600}})
    (tmp_path / "tuned").mkdir()
    config = loaded_config(tuned, tmp_path / "tuned")
    assert (config.engine.collective_timeout_s, config.engine.rank_start_timeout_s) == (120, 1800.5)
    assert (config.router.stall_timeout_s, config.router.drain_timeout_s) == (300, 600)
    (raycluster,) = by_kind(tuned, "RayCluster")
    head_pod = containers(raycluster)["head"][1]
    assert head_pod["terminationGracePeriodSeconds"] == 660  # SIGKILL never cuts the drain short

def test_the_most_urgent_priority_allowed_is_set_from_values(tmp_path):
    assert loaded_config(render({}), tmp_path).router.min_priority is None
    for value in (0, -5, 2**31 - 1):
        (tmp_path / str(value)).mkdir()
        config = loaded_config(render({"router": {"minPriority": value}}), tmp_path / str(value))
        assert config.router.min_priority == value


def test_tp2_with_four_workers_asks_kuberay_for_four_pods_of_two_gpus(tmp_path):
    objects = render(TP2_FOUR_WORKERS)
    config = loaded_config(objects, tmp_path)
    assert config.engine.tensor_parallel_size == 2 and config.workers.count == 4 and config.workers.num_gpus == 2
    assert config.engine.model == "/models/llama3-8b" and config.engine.max_model_len == 32768
    assert config.engine.cache.memory == "0.9"
    (raycluster,) = by_kind(objects, "RayCluster")
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    worker, pod = containers(raycluster)["gpu-workers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])


def test_an_external_redis_cluster_with_tls_is_reached_as_configured(tmp_path):
    objects = render(EXTERNAL_REDIS_CLUSTER)
    redis = loaded_config(objects, tmp_path).kvstore.redis
    assert (redis.url, redis.cluster, redis.username) == ("rediss://redis-0.redis.cache:6379/0", True, "kvtier")
    assert redis.cluster_nodes == ("redis-1.redis.cache:6379", "redis-2.redis.cache:6379")
    assert redis.ca_file == "/etc/kvtier/redis-ca/ca.crt"
    assert not by_kind(objects, "StatefulSet") and not by_kind(objects, "Secret")  # nothing bundled


def test_ray_token_auth_off_is_off_in_kuberay_and_in_kvtier_alike(tmp_path):
    objects = render({"ray": {"auth": {"enabled": False}}})
    assert loaded_config(objects, tmp_path).ray.auth == "disabled"
    (raycluster,) = by_kind(objects, "RayCluster")
    assert "authOptions" not in raycluster["spec"]


def test_tls_and_auth_turn_on_in_the_router_and_ray(tmp_path):
    objects = render(TLS_AND_AUTH)
    router = loaded_config(objects, tmp_path).router
    assert router.tls.enabled and router.tls.client_ca_file == "/etc/kvtier/tls/ca.crt"
    assert router.auth.tokens_file == "/etc/kvtier/auth/tokens.yaml"
    (raycluster,) = by_kind(objects, "RayCluster")
    assert raycluster["spec"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    head, _ = containers(raycluster)["head"]
    assert head["readinessProbe"]["grpc"] == {"port": router.health_port, "service": "kvtier.v1.Generation"}
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_every_kvtier_container_runs_as_non_root(tmp_path):
    for values in VALUE_SETS.values():
        objects = render(values)
        pods = [group[1] for obj in by_kind(objects, "RayCluster") for group in containers(obj).values()]
        pods += [obj["spec"]["template"]["spec"] for obj in by_kind(objects, "StatefulSet")]
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert "resources" in container and container["resources"]["limits"]


INVALID = {
    "tp 0": ({"workers": {"tensorParallelSize": 0}}, "workers.tensorParallelSize"),
    "negative replicas": ({"workers": {"replicas": -1}}, "workers.replicas"),
    "unknown policy": ({"router": {"policy": "fastest"}}, "router.policy"),
    "unknown value": ({"router": {"polcy": "cache_aware"}}, "polcy"),
    "external redis without url": ({"redis": {"mode": "external"}}, "redis.external.url: required"),
    "tls without secret": ({"router": {"tls": {"enabled": True}}}, "router.tls.secretName: required"),
    "bad block size": ({"engine": {"blockSize": 12}}, "engine.blockSize"),
    "zero redis timeout": ({"redis": {"socketTimeoutSeconds": 0}}, "redis.socketTimeoutSeconds"),
    "negative refresh": ({"redis": {"refreshSeconds": -1}}, "redis.refreshSeconds"),
    "zero collective timeout": ({"engine": {"collectiveTimeoutSeconds": 0}}, "engine.collectiveTimeoutSeconds"),
    "negative drain": ({"router": {"drainTimeoutSeconds": -1}}, "router.drainTimeoutSeconds"),
    "fractional min priority": ({"router": {"minPriority": 0.5}}, "router.minPriority"),
    "cluster node without port": ({"redis": {"mode": "external", "external": {
        "url": "redis://r:6379/0", "cluster": True, "clusterNodes": ["r2"]}}}, "redis.external.clusterNodes.0"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_values_fail_rendering_naming_the_value(case):
    values, named = INVALID[case]
    with pytest.raises(ChartRenderError) as caught:
        render(values)
    message = str(caught.value)
    assert named in message.replace("/", "."), message


def test_values_yaml_documents_every_value():
    """Every key of the top two levels of values.yaml has a comment: on the line above, or after it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        line for index, line in enumerate(lines)
        if line.strip() and not line.lstrip().startswith(("#", "-")) and ":" in line
        and len(line) - len(line.lstrip()) <= 2 and "#" not in line and not lines[index - 1].lstrip().startswith("#")
    ]
    assert not undocumented, undocumented


def test_helm_lint_is_clean():
    import helm_python

    report = helm_python.lint(CHART, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_a_deep_copy_of_values_renders_identically_but_for_the_random_password():
    first, second = render(copy.deepcopy(TLS_AND_AUTH)), render(copy.deepcopy(TLS_AND_AUTH))
    strip = [o for o in first if o["kind"] != "Secret"], [o for o in second if o["kind"] != "Secret"]
    assert strip[0] == strip[1]


def test_the_schema_check_rejects_what_the_api_server_would():
    import jsonschema
    from kubernetes_validate.utils import SchemaNotFoundError

    objects = render({})
    (raycluster,) = by_kind(objects, "RayCluster")
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolice"):
        validate(broken)
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = -1
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "kv-kvtier"]
    broken = copy.deepcopy(service)
    broken["spec"]["ports"][0]["port"] = "grpc"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    with pytest.raises(SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_chart_image_and_project_agree_on_versions():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = CHART.parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert f"ray=={values['ray']['version']}" in project["dependencies"]
    assert chart["appVersion"] == project["version"]
    dockerfile = (root / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(values["podSecurityContext"]["runAsUser"])
