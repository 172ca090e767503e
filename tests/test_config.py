"""Tests of config loading: presets, parameter counts, overrides, validation, YAML round trips."""

import dataclasses

import jax
import pytest

from jaxllm.config import (
    Config,
    ConfigError,
    available_presets,
    load_config,
    read_config,
    save_config,
)
from jaxllm.errors import UserInputError
from jaxllm.model import count_params, param_shapes

KNOWN_PRESETS = ("tiny", "small", "seed-190m", "llama3.2-1b")


def test_known_presets_are_available():
    for name in KNOWN_PRESETS:
        assert name in available_presets()


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_loads(name):
    config = load_config(name)

    assert isinstance(config, Config)
    assert config.data.seq_len <= config.model.max_seq_len


# Exact counts from ModelConfig.num_params, per layer = 2*D*N*H + 2*D*K*H + 3*D*F + 2*D:
#   tiny:      4096*256 + 4 * (131072 + 65536 + 540672 + 512) + 256        =   4,000,000
#   small:     8192*512 + 8 * (524288 + 262144 + 1966080 + 1024) + 512     =  26,223,104
#   seed-190m: 32768*1024 + 12 * (2097152 + 1048576 + 10223616 + 2048) + 1024 = 194,012,160
# The ranges are the stated sizes (about 4M, 25M and 190M) give or take 10%.
@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 3_600_000, 4_400_000),
        ("small", 22_500_000, 27_500_000),
        ("seed-190m", 171_000_000, 209_000_000),
    ],
)
def test_preset_parameter_count_in_stated_range(name, low, high):
    model = load_config(name).model

    counted = count_params(param_shapes(model))

    assert low <= counted <= high
    assert counted == model.num_params()


def test_llama32_1b_parameter_count_is_exact():
    model = load_config("llama3.2-1b").model

    shapes = param_shapes(model)
    counted = count_params(shapes)

    # V*D = 128256*2048 = 262,668,288 (tied, so no separate head).
    # Per layer: q and o 2*2048*32*64 = 8,388,608; k and v 2*2048*8*64 = 2,097,152;
    # MLP 3*2048*8192 = 50,331,648; two norms 4,096; sum 60,821,504, times 16 = 973,144,064.
    # Final norm 2,048. Total 262,668,288 + 973,144,064 + 2,048 = 1,235,814,400.
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    assert counted == 1_235_814_400
    assert model.num_params() == 1_235_814_400


@pytest.mark.parametrize(
    "preset, override, section, field, expected",
    [
        ("tiny", "train.steps=200", "train", "steps", 200),
        ("tiny", "optimizer.learning_rate=0.0005", "optimizer", "learning_rate", 0.0005),
        ("tiny", "optimizer.learning_rate=2.0e-4", "optimizer", "learning_rate", 2.0e-4),
        # An integer given for a float field is converted to float.
        ("tiny", "model.rope_theta=500000", "model", "rope_theta", 500000.0),
        ("tiny", "model.tie_embeddings=false", "model", "tie_embeddings", False),
        ("tiny", "data.tokenizer=tok.json", "data", "tokenizer", "tok.json"),
        ("llama3.2-1b", "model.rope_scaling=null", "model", "rope_scaling", None),
        ("tiny", "data.files=[a.txt, b.txt]", "data", "files", ("a.txt", "b.txt")),
    ],
)
def test_override_sets_typed_value(preset, override, section, field, expected):
    config = load_config(preset, [override])

    value = getattr(getattr(config, section), field)

    assert value == expected
    assert type(value) is type(expected)


def test_override_float_in_exponent_form():
    # 1e-4 is a float in Python and in YAML 1.2, but PyYAML follows YAML 1.1, whose float
    # pattern needs a dot, and loads it as the string "1e-4".
    config = load_config("tiny", ["optimizer.learning_rate=1e-4"])

    assert config.optimizer.learning_rate == 1e-4


def test_override_nested_section_field():
    config = load_config("llama3.2-1b", ["model.rope_scaling.factor=16"])

    assert config.model.rope_scaling.factor == 16.0
    assert config.model.rope_scaling.original_max_seq_len == 8192


def test_override_without_equals_sign_raises():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["train.steps"])


def test_unknown_key_names_key_and_close_match():
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["model.num_head=4"])

    message = str(raised.value)
    assert "model.num_head" in message
    assert "did you mean model.num_heads?" in message


def test_unknown_section_raises():
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["modle.num_heads=4"])

    message = str(raised.value)
    assert "modle" in message
    assert "did you mean model?" in message


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as raised:
        load_config("no-such-preset")

    message = str(raised.value)
    assert "no-such-preset" in message
    for name in KNOWN_PRESETS:
        assert name in message


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.steps=abc", "train.steps", "'abc'"),
        ("train.steps=2.5", "train.steps", "2.5"),
        ("model.tie_embeddings=3", "model.tie_embeddings", "3"),
        ("optimizer.learning_rate=true", "optimizer.learning_rate", "True"),
    ],
)
def test_wrong_type_names_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [override])

    message = str(raised.value)
    assert key in message
    assert value in message


def test_seq_len_longer_than_context_raises():
    # tiny has model.max_seq_len 256.
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["data.seq_len=512"])

    message = str(raised.value)
    assert "data.seq_len (512)" in message
    assert "model.max_seq_len (256)" in message


def test_num_heads_not_multiple_of_kv_heads_raises():
    # tiny has 8 query heads, which 3 kv heads cannot share evenly.
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", ["model.num_kv_heads=3"])

    assert "model.num_kv_heads (3)" in str(raised.value)


def test_invalid_dataclass_replace_raises_config_error():
    model = load_config("tiny").model

    with pytest.raises(ConfigError, match="model.num_heads"):
        dataclasses.replace(model, num_heads=6)


def test_config_error_is_user_input_error():
    assert issubclass(ConfigError, UserInputError)


@pytest.mark.parametrize("name", available_presets())
def test_save_then_read_round_trip(name, tmp_path):
    config = load_config(name, ["data.files=[a.txt, corpus/*.jsonl]"])
    path = tmp_path / "config.yaml"

    save_config(config, path)
    reread = read_config(path)

    assert reread == config


def test_override_unparsable_yaml_names_key():
    # An unquoted leading * is a YAML alias, so the list below cannot be parsed.
    with pytest.raises(ConfigError, match=r"cannot parse the value of data\.files") as raised:
        load_config("tiny", ["data.files=[*.txt]"])
    assert "quote" in str(raised.value)
    assert load_config("tiny", ['data.files=["*.txt"]']).data.files == ("*.txt",)
