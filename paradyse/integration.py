"""Integrations turned on from the configuration (DESIGN 10): a table `[integrations.NAME]` loads
the module `integrations.NAME` lazily, with the table's keys as its options.

An integration module defines two things:
- `Options`: a frozen dataclass whose fields are the keys its table accepts (typed, with
  defaults, each with a one-line docstring);
- `plug_in(options, run: RunContext) -> Integration`: the parts it plugs into the run.
Nothing imports `integrations` except `integration_module` here, through importlib.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from torch import nn

from parallel_lib import Mesh

from .engine import LayerHooks, OptimizerWrapper

__all__ = [
    "Integration",
    "IntegrationError",
    "RunContext",
    "Stateful",
    "available_integrations",
    "engine_parts",
    "integration_module",
    "plug_in",
]

PACKAGE = "integrations"


class IntegrationError(ValueError):
    """An unknown integration, an unknown or ill-typed option, or a module that does not keep the
    contract; the message is one line saying what to change."""


class Stateful(Protocol):
    """What a checkpoint saves of a part: `state_dict()` of tensors and JSON values, restored by
    `load_state_dict()` (torch's `Stateful`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """What an integration may read when it is plugged in."""

    mesh: Mesh
    model: nn.Module
    """The model, built: `switchable_layers()` are the layers the hooks and wrapper index."""
    layers: int
    """Number of switchable layers."""
    steps: int
    """Optimizer steps of the run (train.steps)."""
    seed: int
    """The run's seed (train.seed)."""


@dataclass
class Integration:
    """The parts an integration plugs in; every one is optional."""

    hooks: Sequence[LayerHooks] = ()
    """Called around every switchable layer (`paradyse.LayerHooks`)."""
    optimizer_wrapper: OptimizerWrapper | None = None
    """Which layers train in a step and where their optimizer state lives."""
    state: Stateful | None = None
    """Saved with every checkpoint and restored on resume."""
    router_hook: Any = None
    """Replaces the routing decision of every MoE layer (`parallel_lib.routing.RouterHook`)."""


def available_integrations() -> list[str]:
    """The modules of the `integrations` package."""
    package = importlib.import_module(PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__))


def integration_module(name: str) -> ModuleType:
    """`integrations.NAME`, imported now; IntegrationError, one line, if there is none or it does
    not define `Options` and `plug_in`."""
    known = available_integrations()
    if name not in known:
        raise IntegrationError(
            f"unknown integration [integrations.{name}]; available: {', '.join(known) or 'none'}"
        )
    module = importlib.import_module(f"{PACKAGE}.{name}")
    options = getattr(module, "Options", None)
    if not (dataclasses.is_dataclass(options) and callable(getattr(module, "plug_in", None))):
        configured_by = getattr(module, "CONFIGURED_BY", None)  # e.g. hf: model.init
        if configured_by:
            raise IntegrationError(
                f"integrations.{name} takes no [integrations.{name}] table: set {configured_by}"
            )
        raise IntegrationError(
            f"integrations.{name} is not an integration: it must define an Options dataclass "
            "and plug_in(options, run)"
        )
    return module


def options_of(name: str, table: Mapping[str, Any], coerce) -> Any:
    """The module's `Options` from a config table; `coerce(key, value, type)` types each value
    (the config's own rules). IntegrationError, one line, for an unknown key or a bad value."""
    options_type = integration_module(name).Options
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = [key for key in table if key not in fields]
    if unknown:
        raise IntegrationError(
            f"unknown option integrations.{name}.{unknown[0]}; options of [integrations.{name}]: "
            f"{', '.join(fields) or 'none'}"
        )
    hints = typing.get_type_hints(options_type)
    values = {key: coerce(f"integrations.{name}.{key}", v, hints[key]) for key, v in table.items()}
    try:
        return options_type(**values)
    except (TypeError, ValueError) as error:
        raise IntegrationError(f"[integrations.{name}]: {error}") from None


def plug_in(integrations: Mapping[str, Any], run: RunContext) -> dict[str, Integration]:
    """Plug in every configured integration (name -> its Options), in the config's order."""
    plugged = {}
    for name, options in integrations.items():
        parts = integration_module(name).plug_in(options, run)
        if not isinstance(parts, Integration):
            raise IntegrationError(
                f"integrations.{name}.plug_in returned {type(parts).__name__}, not an Integration"
            )
        plugged[name] = parts
    return plugged


def engine_parts(
    plugged: Mapping[str, Integration], hooks=(), optimizer_wrapper=None
) -> tuple[list[LayerHooks], OptimizerWrapper | None, Any]:
    """(every layer hook, the one optimizer wrapper, the one router hook) of the caller's parts
    and the integrations'; two wrappers or two router hooks are an `IntegrationError`."""
    wrappers = {n: i.optimizer_wrapper for n, i in plugged.items() if i.optimizer_wrapper}
    if optimizer_wrapper is not None:
        wrappers["the Trainer's optimizer_wrapper"] = optimizer_wrapper
    if len(wrappers) > 1:
        raise IntegrationError(
            f"{' and '.join(wrappers)} both choose the trainable layers: turn one of them off"
        )
    routers = {n: i.router_hook for n, i in plugged.items() if i.router_hook is not None}
    if len(routers) > 1:
        raise IntegrationError(f"{' and '.join(routers)} both route the MoE layers: turn one off")
    every_hook = [*hooks] + [h for i in plugged.values() for h in i.hooks]
    return every_hook, next(iter(wrappers.values()), None), next(iter(routers.values()), None)
