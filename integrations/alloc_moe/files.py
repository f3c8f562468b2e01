"""The MoE layers a model routes, and Alloc-MoE's JSON files: the sensitivity profile and the
calibrated NAEE betas, each tied to the MoE layers and the K it was measured on.

Sensitivity file: {"layers": [decoder-layer index of each MoE layer], "top_k": K_orig,
"S": [[perplexity at k = 1..K_orig] per MoE layer], "calibration": {anything: data, tokens,
seed...}}. NAEE file: {"layers": [...], "top_k": K_orig, "beta": [one per layer],
"calibration": {...}}. A file that does not match the model is refused in one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .allocate import sensitivity_matrix

__all__ = [
    "MoeLayers",
    "Sensitivity",
    "load_naee_beta",
    "load_sensitivity",
    "moe_layers_of",
    "save_naee_beta",
    "save_sensitivity",
]


@dataclass(frozen=True)
class MoeLayers:
    """What Alloc-MoE needs to know of a model: its MoE layers and their routing."""

    layers: tuple[int, ...]
    """Decoder-layer index of each MoE layer, in order (`RouterRequest.layer`)."""
    top_k: int
    """K_orig: the experts every MoE layer keeps per token."""
    experts: int
    """E: routed experts per MoE layer."""

    @property
    def full_budget(self) -> int:
        """L * K_orig: the activations per token of the original model."""
        return len(self.layers) * self.top_k


def moe_layers_of(model) -> MoeLayers:
    """The MoE layers of a model built from switchable layers (`paradyse.DecoderModel`): those
    whose MLP has a `moe` shape; ValueError, one line, for a dense model or unequal top_k."""
    if isinstance(model, MoeLayers):
        return model
    found = [(layer.index, layer.mlp.moe) for layer in model.switchable_layers()
             if getattr(getattr(layer, "mlp", None), "moe", None) is not None]  # fmt: skip
    if not found:
        raise ValueError("Alloc-MoE needs a model with MoE layers: set [model.moe]")
    shapes = {(m.top_k, m.experts) for _, m in found}
    if len(shapes) > 1:
        raise ValueError(f"Alloc-MoE needs one top_k and expert count in every MoE layer: {shapes}")
    ((top_k, experts),) = shapes
    return MoeLayers(tuple(i for i, _ in found), top_k, experts)


@dataclass(frozen=True)
class Sensitivity:
    """A sensitivity profile: `S[i][k-1]` = calibration perplexity with MoE layer `layers[i]`
    at top-k (deeper MoE layers at top-1, shallower at K_orig)."""

    layers: tuple[int, ...]
    top_k: int
    S: list[list[float]]
    calibration: dict[str, Any] = field(default_factory=dict)


def _write(path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _read(path, what: str, keys: Sequence[str]) -> dict:
    """The JSON object at `path` with `keys`; ValueError, one line, otherwise."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {what} file at {path}") from None
    except (OSError, json.JSONDecodeError) as error:
        reason = str(error).replace("\n", " ")
        raise ValueError(f"cannot read the {what} file {path}: {reason}") from None
    missing = [k for k in keys if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"the {what} file {path} lacks {', '.join(missing)}")
    return record


def _check_model(path, what: str, layers, top_k, moe: MoeLayers) -> tuple[int, ...]:
    try:
        layers, top_k = tuple(int(i) for i in layers), int(top_k)
    except (TypeError, ValueError):
        raise ValueError(f"the {what} file {path}: layers must be integers, top_k one") from None
    if layers != moe.layers or top_k != moe.top_k:
        raise ValueError(
            f"the {what} file {path} is for MoE layers {list(layers)} at top_k={top_k}, the model "
            f"has MoE layers {list(moe.layers)} at top_k={moe.top_k}: profile this model again"
        )
    return layers


def save_sensitivity(
    path, S, layers: Sequence[int], top_k: int, calibration: Mapping[str, Any] | None = None
) -> None:
    """Write a sensitivity profile (L rows of `top_k` finite values, one per layer of `layers`)."""
    rows = sensitivity_matrix(S)
    if len(rows) != len(layers) or len(rows[0]) != top_k:
        raise ValueError(
            f"the sensitivity matrix is {len(rows)} x {len(rows[0])}, expected one row per MoE "
            f"layer ({len(layers)}) of top_k={top_k} values"
        )
    _write(path, {"layers": [int(i) for i in layers], "top_k": int(top_k), "S": rows,
                  "calibration": dict(calibration or {})})  # fmt: skip


def load_sensitivity(path, model) -> Sensitivity:
    """The profile at `path`, checked against `model` (a model or `MoeLayers`): the same MoE
    layers, top_k, and an L x top_k finite matrix; ValueError, one line, otherwise."""
    moe = moe_layers_of(model)
    record = _read(path, "sensitivity", ("layers", "top_k", "S"))
    layers = _check_model(path, "sensitivity", record["layers"], record["top_k"], moe)
    try:
        rows = sensitivity_matrix(record["S"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if len(rows) != len(layers) or len(rows[0]) != moe.top_k:
        raise ValueError(
            f"{path}: S is {len(rows)} x {len(rows[0])}, expected {len(layers)} x {moe.top_k}"
        )
    return Sensitivity(layers, moe.top_k, rows, dict(record.get("calibration") or {}))


def save_naee_beta(
    path, beta: Mapping[int, float], top_k: int, calibration: Mapping[str, Any] | None = None
) -> None:
    """Write calibrated NAEE betas {layer: beta} (`calibrate_naee_beta`)."""
    layers = sorted(beta)
    _write(path, {"layers": layers, "top_k": int(top_k), "beta": [float(beta[i]) for i in layers],
                  "calibration": dict(calibration or {})})  # fmt: skip


def load_naee_beta(path, model) -> dict[int, float]:
    """{layer: beta} from a file of `save_naee_beta`, checked against `model`."""
    moe = moe_layers_of(model)
    record = _read(path, "NAEE beta", ("layers", "top_k", "beta"))
    layers = _check_model(path, "NAEE beta", record["layers"], record["top_k"], moe)
    betas = record["beta"]
    if not isinstance(betas, list) or len(betas) != len(layers):
        raise ValueError(f"{path}: beta needs one value per MoE layer ({len(layers)})")
    if not all(isinstance(b, int | float) and math.isfinite(b) and b >= 0 for b in betas):
        raise ValueError(f"{path}: every beta must be a finite number >= 0")
    return dict(zip(layers, (float(b) for b in betas), strict=True))
