import pytest

from workers.model_config import ModelConfigError, parse_model_config

BASE = dict(
    model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)


def test_transformers_5_rope_parameters():
    config = parse_model_config({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                             "original_max_position_embeddings": 8192}})
    assert config.rope.rope_type == "llama3" and config.rope.theta == 5e5 and config.rope.factor == 8.0
    assert config.head_dim == 16 and config.kv_size == 32


def test_older_rope_theta_and_rope_scaling():
    config = parse_model_config({**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (config.rope.rope_type, config.rope.theta, config.rope.factor) == ("linear", 1e6, 2.0)


def test_qwen2_has_qkv_bias_and_eos_comes_from_generation_config():
    config = parse_model_config({**BASE, "model_type": "qwen2", "eos_token_id": 5}, {"eos_token_id": [7, 8]})
    assert config.qkv_bias and not config.o_bias and config.eos_token_ids == (7, 8)
    assert config.attention_windows == (0, 0)


@pytest.mark.parametrize(
    "change, windows",
    [
        ({"model_type": "mistral", "sliding_window": 32}, (32, 32)),
        ({"model_type": "mistral", "sliding_window": None}, (0, 0)),
        ({"model_type": "mistral"}, (4096, 4096)),  # transformers' default where config.json names none
        ({"model_type": "qwen2", "sliding_window": 32}, (0, 0)),  # only with use_sliding_window
        ({"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": True, "max_window_layers": 1}, (0, 32)),
        ({"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": True,
          "layer_types": ["sliding_attention", "full_attention"]}, (32, 0)),
        ({"model_type": "llama", "sliding_window": 32}, (0, 0)),
    ],
)
def test_each_layers_sliding_window_is_read_as_transformers_reads_it(change, windows):
    assert parse_model_config({**BASE, **change}).attention_windows == windows


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type: 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide"),
        ({"vocab_size": None}, "vocab_size: missing"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type: 'yarn' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3"}}, "rope_parameters.factor: required"),
        ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["full_attention"]},
         "layer_types: expected 2"),
    ],
)
def test_unsupported_configs_name_the_key(change, message):
    with pytest.raises(ModelConfigError, match=message):
        parse_model_config({**BASE, **change})


def test_prefill_work_of_the_llama3_8b_shape():
    config = parse_model_config(dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
    work = config.prefill_work()
    assert work.per_token == 2 * 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)  # 6.98e9 weights
    assert work.per_token == 13_958_643_712
    assert work.per_attended == 4 * 32 * 4096
