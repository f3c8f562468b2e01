"""paradyse.config: the built-in defaults against cpu_tiny.toml, and every ConfigError a user can
cause (unknown section or key, wrong type, malformed --set, missing or invalid file, values out of
range), each reported in one line that names the key."""

from __future__ import annotations

import dataclasses

import pytest

from paradyse.config import Config, ConfigError, load_config
from paradyse.train import DEFAULT_CONFIG


def _error(path, overrides=()) -> str:
    """The message of the ConfigError that load_config raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def _toml(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_equal_cpu_tiny_except_the_profile():
    """train.DEFAULT_CONFIG promises the built-in defaults equal cpu_tiny.toml except that no
    cost-model profile is measured."""
    built_in, from_file = load_config(None), load_config(DEFAULT_CONFIG)
    differ = []
    for section in dataclasses.fields(Config):
        ours, theirs = getattr(built_in, section.name), getattr(from_file, section.name)
        if not dataclasses.is_dataclass(ours):  # [integrations]: none in either
            assert ours == theirs == {}, (section.name, ours, theirs)
            continue
        for f in dataclasses.fields(ours):
            a, b = getattr(ours, f.name), getattr(theirs, f.name)
            if (section.name, f.name) == ("parallel", "profile"):
                assert a == "" and b, f"parallel.profile: defaults {a!r}, file {b!r}"
            elif a != b or type(a) is not type(b):
                differ.append(f"{section.name}.{f.name}: defaults {a!r}, file {b!r}")
    assert not differ, "; ".join(differ)


def test_unknown_section():
    message = _error(None, ["modle.hidden=64"])
    assert "[modle]" in message and "model, data, optim, train, parallel" in message


def test_unknown_section_in_file(tmp_path):
    message = _error(_toml(tmp_path, "[trian]\nsteps = 3\n"))
    assert "[trian]" in message and "run.toml" in message and "train" in message


def test_unknown_key_names_it_and_lists_the_keys(tmp_path):
    message = _error(None, ["train.stpes=3"])
    assert "train.stpes" in message
    assert "steps, seed, dtype, measure_memory" in message
    message = _error(_toml(tmp_path, "[train]\nstpes = 3\n"))
    assert "train.stpes" in message and "run.toml" in message and "steps" in message


@pytest.mark.parametrize(
    "text, key",
    [
        ('[train]\nsteps = "ten"\n', "train.steps"),
        ("[train]\nsteps = 1.5\n", "train.steps"),
        ("[train]\nsteps = true\n", "train.steps"),  # a bool is not an int here
        ('[train]\nmeasure_memory = "maybe"\n', "train.measure_memory"),
        ("[train]\ndtype = 32\n", "train.dtype"),
        ('[optim]\nlr = "fast"\n', "optim.lr"),
        ("[optim]\nbetas = 0.9\n", "optim.betas"),
        ("[optim]\nbetas = [0.9]\n", "optim.betas"),
        ("[model]\nhidden = [64]\n", "model.hidden"),
        ("model = 3\n", "[model]"),  # a section must be a table
    ],
)
def test_wrong_type_in_toml(tmp_path, text, key):
    assert key in _error(_toml(tmp_path, text))


@pytest.mark.parametrize(
    "override, key, bad",
    [
        ("train.steps=abc", "train.steps", "abc"),
        ("train.steps=3.5", "train.steps", "3.5"),
        ("train.measure_memory=maybe", "train.measure_memory", "maybe"),
        ("optim.lr=fast", "optim.lr", "fast"),
        ("optim.betas=0.9", "optim.betas", "0.9"),
        ("optim.betas=0.9,0.99,0.999", "optim.betas", "0.9,0.99,0.999"),
        ("optim.betas=0.9,abc", "optim.betas", "abc"),
    ],
)
def test_wrong_type_in_set(override, key, bad):
    """The message names the key and quotes the value (or the element) it could not use."""
    message = _error(None, [override])
    assert key in message and repr(bad) in message


def test_set_coerces_to_the_field_type():
    config = load_config(
        None,
        [
            "train.measure_memory=false",
            "train.progress=no",
            "optim.shard_optimizer=TRUE",
            "optim.lr=3e-4",
            "optim.grad_clip=2",
            "optim.betas=0.9,0.99",
            "train.steps= 7 ",
            "parallel.profile=",
        ],
    )
    assert config.train.measure_memory is False and config.train.progress is False
    assert config.optim.shard_optimizer is True
    assert config.optim.lr == 3e-4
    assert config.optim.grad_clip == 2.0 and type(config.optim.grad_clip) is float
    assert config.optim.betas == (0.9, 0.99) and type(config.optim.betas) is tuple
    assert config.train.steps == 7
    assert config.parallel.profile == ""
    for text in ("1", "yes", "True"):
        assert load_config(None, [f"train.progress={text}"]).train.progress is True
    for text in ("0", "no", "False"):
        assert load_config(None, [f"train.progress={text}"]).train.progress is False


def test_toml_values_coerced_too(tmp_path):
    config = load_config(_toml(tmp_path, "[optim]\nlr = 1\nbetas = [0.8, 0.9]\n"))
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.optim.betas == (0.8, 0.9) and type(config.optim.betas) is tuple


def test_file_then_overrides_in_order(tmp_path):
    path = _toml(tmp_path, "[train]\nsteps = 5\nseed = 9\n")
    config = load_config(path, ["train.steps=6", "train.steps=8"])
    assert (config.train.steps, config.train.seed) == (8, 9)
    assert config.model == load_config(None).model  # untouched sections keep the defaults


@pytest.mark.parametrize("override", ["train.steps", "trainsteps=3", "=3", "train.=3", ".steps=3"])
def test_malformed_set(override):
    message = _error(None, [override])
    assert repr(override) in message and "section.key=value" in message


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    message = _error(missing)
    assert str(missing) in message and "does not exist" in message


def test_invalid_toml(tmp_path):
    message = _error(_toml(tmp_path, "[train\nsteps = \n"))
    assert "run.toml" in message and "not valid TOML" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.betas=0.9,1.0", "optim.betas"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        ("optim.eps=0", "optim.eps"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("model.layers=0", "model.layers"),
        ("model.hidden=-64", "model.hidden"),
        ("model.vocab=0", "model.vocab"),
        ("train.logits_chunk=-1", "train.logits_chunk"),
    ],
)
def test_out_of_range(override, key):
    assert key in _error(None, [override])


def test_out_of_range_in_file(tmp_path):
    message = _error(_toml(tmp_path, "[model]\nlayers = 0\n"))
    assert "model.layers" in message and "run.toml" in message


def test_inconsistent_model_shape_in_file(tmp_path):
    message = _error(_toml(tmp_path, "[model]\nheads = 6\nkv_heads = 4\n"))
    assert "heads (6)" in message and "kv_heads (4)" in message


def test_set_fields_that_change_together():
    config = load_config(None, ["model.heads=6", "model.kv_heads=3"])
    assert (config.model.heads, config.model.kv_heads) == (6, 3)
