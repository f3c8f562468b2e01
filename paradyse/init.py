"""Where a run's weights come from: drawn from `train.seed`, or loaded from `model.init =
"SCHEME:PATH"` by the integration of that scheme (`hf:` -> `integrations.hf`, imported by name
only then, like every integration), whose source also sets the model's shape.

An initialiser integration provides `pretrained_model_config(init) -> (ModelConfig, source)`
and `load_pretrained(model, source)`, and reports what the user must change as a ValueError
whose message is one line."""

from __future__ import annotations

import importlib
import os
from dataclasses import fields, replace
from typing import Any

import torch

from parallel_lib import CommGroup

from .config import Config
from .model import DecoderModel, ModelConfig

__all__ = ["InitError", "with_pretrained_shape", "model_source", "build_model", "INIT_SCHEMES"]

INIT_SCHEMES = {"hf": "integrations.hf"}
"""model.init's scheme -> the integration that reads it."""


class InitError(ValueError):
    """A model source that cannot be used; the message is one line saying what to change."""


def _initialiser(init: str):
    scheme = init.partition(":")[0]
    if scheme not in INIT_SCHEMES:
        raise InitError(
            f"model.init {init!r}: write {' or '.join(f'{s}:PATH' for s in INIT_SCHEMES)}"
        )
    try:
        return importlib.import_module(INIT_SCHEMES[scheme])
    except ImportError as error:
        raise InitError(f"model.init {init!r} needs {INIT_SCHEMES[scheme]} ({error}): "
                        "pip install -e '.[hf]'") from None  # fmt: skip


def with_pretrained_shape(config: Config) -> tuple[Config, Any]:
    """`config` with the model's shape read from `model.init`, and the opened source (None,
    and `config` unchanged, without an init). A shape key the config sets to another value
    than the source's is refused rather than silently replaced."""
    init = config.model.init
    if not init:
        return config, None
    scheme, _, path = init.partition(":")
    init = f"{scheme}:{os.path.abspath(path)}" if path else init  # recorded for export
    try:
        model, source = _initialiser(init).pretrained_model_config(init)
    except ValueError as error:  # InitError, or the integration's one-line errors
        raise InitError(f"model.init: {error}") from None
    defaults = ModelConfig()
    clashes = [
        f"model.{f.name} = {getattr(config.model, f.name)!r} (the source has "
        f"{getattr(model, f.name)!r})"
        for f in fields(ModelConfig)
        if f.name != "init"
        and getattr(config.model, f.name) != getattr(defaults, f.name)
        and getattr(config.model, f.name) != getattr(model, f.name)
    ]
    if clashes:
        raise InitError(f"{init} sets the model's shape, but the config also sets "
                        f"{', '.join(clashes)}: remove those keys")  # fmt: skip
    return replace(config, model=model), source


def model_source(config: Config, mesh, *, resuming: bool) -> tuple[Config, Any]:
    """`with_pretrained_shape`, except when resuming a run that started from `model.init`: the
    shape then comes from the checkpoint's manifest (the weights come from the checkpoint), so
    the source is neither read nor needed any more."""
    if config.model.init and resuming:
        from .checkpoint import saved_model

        saved = saved_model(config.train.resume, mesh)
        if saved is not None:
            return replace(config, model=saved), None
    return with_pretrained_shape(config)


def build_model(
    config: Config,
    group: CommGroup,
    source: Any = None,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
    fills: bool = False,
) -> DecoderModel:
    """The model of `config`: loaded from `source` (`with_pretrained_shape`), or drawn from
    train.seed; with `fills` (a checkpoint will fill it) nothing is drawn or read."""
    model = DecoderModel(config.model, group, seed=config.train.seed, dtype=dtype, device=device,
                         random_init=not (fills or source is not None),
                         logits_chunk=config.train.logits_chunk)  # fmt: skip
    if source is not None and not fills:
        try:
            _initialiser(config.model.init).load_pretrained(model, source)
        except ValueError as error:
            raise InitError(f"model.init: {error}") from None
    return model
