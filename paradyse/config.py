"""The run's configuration: dataclasses loaded from TOML (`tomllib`), overridable by `--set`.

Sections: [model] (`ModelConfig`), [data], [optim] (`OptimConfig`), [train], [parallel], and
[integrations.NAME] tables that turn an integration on with its options (`paradyse.integration`).
An unknown section, key or integration, or a value of the wrong type, is a `ConfigError` whose
one line names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cost_models import LOGITS_CHUNK
from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES
from planners import parse_bytes

from .integration import IntegrationError, options_of
from .model import ModelConfig
from .moe import MoeConfig
from .optim import OptimConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ParallelConfig",
    "TrainConfig",
    "load_config",
    "apply_override",
]


DTYPES = ("float32", "bfloat16")
STRATEGY_CHOICES = ("adaptive", *STRATEGY_NAMES)
PLANNER_CHOICES = ("exact", "paradyse")


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message is one line saying what to change."""


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how steps and micro-batches are cut."""

    source: str = "stdlib"
    """stdlib (the running Python's standard library sources), files, instruct (jsonl
    prompt/response or messages records, prompts masked out of the loss), or synthetic."""
    path: str = ""
    """files: a .jsonl file, a text file or a directory of them; instruct: a .jsonl file or a
    directory of them."""
    field: str = "text"
    """files: the JSON key holding each document's text."""
    tokenizer: str = "bytes"
    """bytes (byte-level, vocab 256), a local Hugging Face tokenizer directory or a .gguf file."""
    distribution: str = "githubcode"
    """synthetic: githubcode or grch38 (paradyse.lengths)."""
    documents: int = 10000
    """synthetic: how many documents."""
    tokens_per_step: int = 12288
    """Global batch: documents are taken while a step's tokens stay within this."""
    max_seq_len: int = 4096
    """Longer documents are split (with a warning) into pieces of at most this many tokens."""
    tokens_per_rank: int = 2048
    """Micro-batch budget: padded tokens per rank of the sp group."""


@dataclass(frozen=True)
class TrainConfig:
    """The loop."""

    steps: int = 12
    """Optimizer steps."""
    seed: int = 0
    """Weights and data order."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16 (master weights and optimizer state stay float32)."""
    measure_memory: bool = True
    """Measure every step's peak memory (MemTracker on CPU, slows CPU steps about 2x)."""
    logits_chunk: int = LOGITS_CHUNK
    """Tokens per chunk of the loss's LM head and cross-entropy, recomputed in backward, so the
    (tokens x vocab) float32 logits never exist at once (0 = the whole logits at once)."""
    metrics: str = ""
    """JSONL file for one record per step ('' = none)."""
    progress: bool = True
    """A progress line per step on rank 0."""
    save: str = ""
    """Checkpoint folder ('' = none): DIR/step-N every save_every steps and at the end."""
    save_every: int = 0
    """Steps between checkpoints (0 = only at the end)."""
    resume: str = ""
    """Continue from this checkpoint (or a folder whose `latest` names one)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be at least 1, got {self.steps}")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got {self.seed}")
        if self.save_every < 0:
            raise ValueError(f"train.save_every must be >= 0, got {self.save_every}")
        if self.logits_chunk < 0:
            raise ValueError(f"train.logits_chunk must be >= 0 (0: whole logits), got "
                             f"{self.logits_chunk}")  # fmt: skip
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Parallelism and planning."""

    sp: int = 0
    """Switchable group size (0 = the world size)."""
    strategy: str = "adaptive"
    """adaptive (the planner decides per layer and micro-batch) or one strategy everywhere."""
    planner: str = "exact"
    """exact or paradyse: the method of adaptive."""
    recompute: str = ""
    """none, selective or full forces one mode; '' lets the planner decide."""
    memory_budget: str = ""
    """Per-rank budget the planner respects, e.g. 512MiB ('' = the device's memory)."""
    profile: str = ""
    """Cost-model profile JSON ('' = datasheet rates). {sp}, {dtype} and {device} are filled
    in; a missing file is measured on this machine first and written there."""
    profile_check: float = 1.5
    """A cached profile is checked at start-up against a few quick measurements; a coefficient
    off by more than this factor (measured / profiled, either way) is a warning with the
    command that re-measures it. 0 turns the check off."""
    group_size: int = 0
    """0: adaptive chooses per micro-batch whether the sp group runs as sub-groups of g ranks
    (g dividing sp), each on its own sequences; g: every micro-batch runs on sub-groups of g
    (with fewer than sp/g sequences the sub-groups dealt none train one token with no
    target)."""

    def __post_init__(self) -> None:
        choices = (
            ("sp", self.sp >= 0, "0 (the world size) or a divisor of the world size"),
            ("group_size", self.group_size >= 0,
             "0 (the planner chooses) or a divisor of sp"),
            ("strategy", self.strategy in STRATEGY_CHOICES, ", ".join(STRATEGY_CHOICES)),
            ("planner", self.planner in PLANNER_CHOICES, ", ".join(PLANNER_CHOICES)),
            ("recompute", self.recompute in ("", *RECOMPUTE_MODES),
             "'' (the planner decides), " + ", ".join(RECOMPUTE_MODES)),
        )  # fmt: skip
        for key, ok, allowed in choices:
            if not ok:
                value = getattr(self, key)
                raise ValueError(f"parallel.{key} must be {allowed}; got {value!r}")
        if not (self.profile_check == 0 or self.profile_check > 1):
            raise ValueError(
                f"parallel.profile_check must be 0 (no check) or a factor above 1, e.g. 1.5; "
                f"got {self.profile_check!r}"
            )
        if self.group_size and self.strategy != "adaptive":
            raise ValueError(
                f"parallel.group_size={self.group_size} needs --strategy adaptive (a static "
                f"strategy runs on the whole sp group); got --strategy {self.strategy}"
            )
        self.budget_bytes  # noqa: B018  (parses memory_budget, or says what is wrong with it)

    @cached_property
    def budget_bytes(self) -> int | None:
        """memory_budget in bytes (parsed once); None: the device's memory."""
        if not self.memory_budget:
            return None
        return parse_bytes(self.memory_budget, "--memory-budget")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    integrations: dict[str, Any] = field(default_factory=dict)
    """[integrations.NAME] tables: name -> that integration's checked `Options`, in file order."""


INTEGRATIONS = "integrations"
_SECTIONS = {
    f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != INTEGRATIONS
}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _coerce(key: str, value: Any, kind) -> Any:
    """`value` (from TOML, or a string from --set) as the field's type."""
    from_text = isinstance(value, str)
    if typing.get_origin(kind) is tuple:
        items = value.split(",") if from_text else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = typing.get_args(kind)
        if len(items) != len(inner):
            raise ConfigError(f"{key} needs {len(inner)} values, got {value!r}")
        return tuple(_coerce(key, v, t) for v, t in zip(items, inner, strict=True))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif isinstance(kind, types.UnionType):
        return value
    raise ConfigError(f"{key} must be {_type_name(kind)}, got {value!r}")


_NESTED = {("model", "moe"): MoeConfig}
"""Sub-tables of a section: [model.moe] in TOML, --set model.moe.KEY=VALUE."""


def _checked(name: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    """The table's values typed as its section's fields; unknown sections and keys refused.
    A sub-table ([model.moe], or a key `moe.KEY`) stays a dict of raw values until the end."""
    if name not in _SECTIONS:
        known = ", ".join([*_SECTIONS, f"{INTEGRATIONS}.NAME"])
        raise ConfigError(f"unknown config section [{name}] in {where}; sections: {known}")
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] in {where} must be a table of keys")
    kinds = _field_types(type(_SECTIONS[name]()))
    nested = {}
    for key in list(values):
        head, dot, rest = key.partition(".")
        if (name, head) in _NESTED and (dot or isinstance(values[key], dict)):
            table = {rest: values[key]} if dot else values[key]
            nested.setdefault(head, {}).update(table)
    values = {k: v for k, v in values.items() if k.partition(".")[0] not in nested}
    for key in values:
        if key not in kinds:
            raise ConfigError(
                f"unknown config key {name}.{key} in {where}; keys of [{name}]: {', '.join(kinds)}"
            )
    return {k: _coerce(f"{name}.{k}", v, kinds[k]) for k, v in values.items()} | nested


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The defaults, updated by the TOML file at `path` (if any), then by `section.key=value`
    overrides in order (`integrations.NAME.key=value` for an integration's option). Keys and
    types are checked as they come; each section is built (and its values checked together, e.g.
    heads against kv_heads) once everything is applied."""
    tables: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    integrations: dict[str, dict[str, Any]] = {}
    sources = ["the defaults"]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass --config "
                              "launch/configs/cpu_tiny.toml or another TOML file")  # fmt: skip
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        sources = [str(path)]
        for name, values in data.items():
            if name == INTEGRATIONS:
                _add_integrations(integrations, values, str(path))
            else:
                checked = _checked(name, values, str(path))  # refuses an unknown section
                tables[name].update(checked)
    for text in overrides:
        section, key, value = _split_override(text)
        if section == INTEGRATIONS:
            name, dot, option = key.partition(".")
            if not dot or not name or not option:
                raise ConfigError(f"--set {text!r}: write integrations.NAME.key=value")
            _add_integrations(integrations, {name: {option: value}}, f"--set {text}")
        else:
            checked = _checked(section, {key: value}, f"--set {text}")
            for head, table in checked.items():  # a sub-table's keys merge into it
                nested = (section, head) in _NESTED and isinstance(table, dict)
                if nested and isinstance(tables[section].get(head), dict):
                    table = tables[section][head] | table
                tables[section][head] = table
        sources.append(f"--set {section}.{key}")
    where = " + ".join(sources)
    sections = {}
    for name, values in tables.items():
        try:
            for (section, head), kind in _NESTED.items():
                if section == name and isinstance(values.get(head), dict):
                    values[head] = kind.from_table(values[head], _coerce)
            sections[name] = type(_SECTIONS[name]())(**values)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{error} (config from {where})") from None
    try:
        chosen = {name: options_of(name, table, _coerce) for name, table in integrations.items()}
    except IntegrationError as error:
        raise ConfigError(f"{error} (config from {where})") from None
    return Config(**sections, integrations=chosen)


def _add_integrations(into: dict[str, dict[str, Any]], values: Any, where: str) -> None:
    """Merge [integrations.NAME] tables (name -> {option: value}) into `into`."""
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ConfigError(
            f"[integrations] in {where} must hold tables [integrations.NAME] of options"
        )
    for name, options in values.items():
        into.setdefault(name, {}).update(options)


def _split_override(text: str) -> tuple[str, str, str]:
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: write section.key=value, e.g. --set train.steps=10")
    return section, key.strip(), value.strip()


def apply_override(config: Config, section: str, **values: Any) -> Config:
    """A copy of `config` with fields of one section replaced (values already typed)."""
    current = getattr(config, section)
    try:
        return dataclasses.replace(config, **{section: dataclasses.replace(current, **values)})
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
