import pytest

from cluster.config import ConfigError, KvtierConfig, load_config
from workers.engine_config import EngineConfig, MemoryBudget, parse_memory


def test_defaults_load_without_a_file():
    assert load_config() == KvtierConfig()
    assert load_config().engine.cache.block_size == 16


def test_yaml_and_overrides_merge_with_overrides_winning(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text("engine:\n  model: /models/x\n  cache:\n    block_size: 32\n    memory: 0.5\n")
    config = load_config(path, {"engine": {"cache": {"block_size": 8}}})
    assert config.engine.model == "/models/x"
    assert config.engine.cache.block_size == 8
    assert config.engine.cache.memory == "0.5"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"engine": {"cache": {"block_size": 3}}}, "engine.cache.block_size: must be a power of two"),
        ({"engine": {"cache": {"blok_size": 16}}}, "engine.cache.blok_size: unknown key (did you mean 'block_size'?)"),
        ({"engine": {"scheduler": {"max_num_seqs": "many"}}}, "engine.scheduler.max_num_seqs: must be int, got str"),
        ({"engine": {"scheduler": {"max_num_seqs": True}}}, "engine.scheduler.max_num_seqs: must be int, got bool"),
        ({"engine": {"cache": {"memory": "lots"}}}, "engine.cache.memory: 'lots' is not 'auto'"),
        ({"engine": {"device": "tpu"}}, "engine.device: 'tpu' is not auto"),
        ({"engine": []}, "engine: must be a mapping"),
        ({"routr": {}}, "routr: unknown key"),
        ({"router": {"policy": "random"}}, "router.policy: 'random' is unknown"),
        ({"router": {"min_priority": 2**31}}, "router.min_priority: must be an int32"),
        ({"workers": {"count": 0}}, "workers.count: must be >= 1"),
        ({"kvstore": {"redis": {"staging_memory": "big"}}}, "kvstore.redis.staging_memory: 'big' is not a size"),
        ({"kvstore": {"redis": {"cluster_nodes": ["a:1"]}}}, "kvstore.redis.cluster_nodes: set, but cluster is false"),
        ({"kvstore": {"redis": {"cluster": True, "cluster_nodes": ["a:1", "b"]}}},
         "kvstore.redis.cluster_nodes[1]: 'b' is not host:port"),
        ({"kvstore": {"redis": {"cluster": True, "cluster_nodes": "a:1"}}},
         "kvstore.redis.cluster_nodes: must be a list, got str"),
        ({"kvstore": {"redis": {"refresh_s": -1}}}, "kvstore.redis.refresh_s: must be >= 0"),
    ],
)
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=data)
    assert str(caught.value).startswith(message)


def test_a_file_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_config_objects_are_frozen():
    with pytest.raises(AttributeError):
        EngineConfig().model = "x"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("auto", MemoryBudget()),
        ("0.8", MemoryBudget(fraction=0.8)),
        ("1.0", MemoryBudget(fraction=1.0)),
        ("4GiB", MemoryBudget(num_bytes=4 * 2**30)),
        ("512 MiB", MemoryBudget(num_bytes=512 * 2**20)),
        ("1.5GB", MemoryBudget(num_bytes=1_500_000_000)),
        ("1000000", MemoryBudget(num_bytes=1_000_000)),
    ],
)
def test_memory_budgets(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["1.5", "0.0", "4 parsecs", "-1GiB", ""])
def test_bad_memory_budgets(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def _leaf_paths(node: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in node.items():
        paths |= _leaf_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return paths


def test_the_readme_config_block_lists_every_key_with_its_default():
    """The README's configuration block is the schema's reference: it loads, and it names every key."""
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Configuration", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(block)
    assert load_config(overrides=documented) == KvtierConfig()  # every value shown is the default
    assert _leaf_paths(documented) == _leaf_paths(asdict(KvtierConfig()))


@pytest.mark.parametrize("ray, message", [
    ({"auth": "kerberos"}, "ray.auth: must be token or disabled, got 'kerberos'"),
    ({"auth": "disabled", "auth_token_file": "/t"}, "ray.auth_token_file: set, but auth is disabled"),
])
def test_ray_auth_settings_are_checked(ray, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides={"ray": ray})


def test_redis_readers_leave_a_connection_for_the_writer():
    message = (r"kvstore.redis.read_parallelism: read_parallelism x prefetch_threads \(4 x 2 = 8\) must be below "
               r"max_connections \(8\): one connection stays for the writer")
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"kvstore": {"redis": {"read_parallelism": 4}}})
    one_thread = {"read_parallelism": 7, "prefetch_threads": 1}
    assert load_config(overrides={"kvstore": {"redis": one_thread}}).kvstore.redis.read_parallelism == 7
    with pytest.raises(ConfigError, match="kvstore.redis.prefetch_threads: must be >= 1"):
        load_config(overrides={"kvstore": {"redis": {"prefetch_threads": 0}}})


def test_a_ttl_caps_the_refresh_interval_at_half_of_it():
    assert load_config().kvstore.redis.refresh_interval_s == 60.0
    redis = load_config(overrides={"kvstore": {"redis": {"ttl_s": 30}}}).kvstore.redis
    assert redis.refresh_s == 60.0 and redis.refresh_interval_s == 15.0
    assert load_config(overrides={"kvstore": {"redis": {"ttl_s": 30, "refresh_s": 0}}}).kvstore.redis \
        .refresh_interval_s == 0
