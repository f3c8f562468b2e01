"""Per-step statistics of the mixture-of-experts layers: expert loads, their entropy, the
auxiliary losses, summed over micro-batches and reduced over the whole world."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["MoeStepStats", "load_entropy"]


def load_entropy(load: list[float]) -> float:
    """Entropy (nats) of the expert-load distribution; log(E) when perfectly balanced, 0 when
    one expert takes every pair (and 0 for no pair at all)."""
    total = sum(load)
    if total <= 0:
        return 0.0
    return -sum(n / total * math.log(n / total) for n in load if n > 0)


class MoeStepStats:
    """Sums a model's `MoeRecorder` over the micro-batches of a step (`add` after each backward)
    and reduces it over the world (`reduce`, collective). A model with no MoE layer has none."""

    def __init__(self, model) -> None:
        self.recorder = getattr(model, "moe_recorder", None)
        self.layers: list[int] = []
        self.experts = 0
        for layer in getattr(model, "switchable_layers", list)():
            moe = getattr(layer.mlp, "moe", None)
            if moe is not None:
                self.layers.append(layer.index)
                self.experts = moe.experts
        self._sums: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.layers) and self.recorder is not None

    def add(self) -> None:
        """Fold the recorder's last forward in (loads, aux and z terms per MoE layer)."""
        if not self.enabled:
            return
        rec, E = self.recorder, self.experts
        rows = []
        for layer in self.layers:
            load = rec.load.get(layer)
            load = load.cpu() if load is not None else torch.zeros(E, dtype=torch.float64)
            extra = [rec.aux.get(layer, 0.0), rec.z.get(layer, 0.0)]
            rows.append(torch.cat([load, torch.tensor(extra, dtype=torch.float64)]))
        sums = torch.stack(rows)
        self._sums = sums if self._sums is None else self._sums + sums

    def reduce(self, device, world: int, loss_tokens: int) -> dict | None:
        """{'aux_loss', 'z_loss', 'layers': [{'layer', 'load', 'load_entropy', 'aux_loss',
        'z_loss'}]} over the whole world (losses per loss token, as they enter the loss), then
        reset; None without MoE layers. Every rank must call it."""
        if not self.enabled:
            return None
        E = self.experts
        sums = self._sums
        if sums is None:
            sums = torch.zeros(len(self.layers), E + 2, dtype=torch.float64)
        sums = sums.to(device)
        if world > 1:
            dist.all_reduce(sums)
        sums = sums.cpu()
        self._sums = None
        layers = []
        for layer, row in zip(self.layers, sums, strict=True):
            load = [int(round(v)) for v in row[:E].tolist()]
            layers.append({
                "layer": layer,
                "load": load,
                "load_entropy": load_entropy(load),
                "aux_loss": float(row[E]) / loss_tokens,
                "z_loss": float(row[E + 1]) / loss_tokens,
            })  # fmt: skip
        return {
            "aux_loss": sum(x["aux_loss"] for x in layers),
            "z_loss": sum(x["z_loss"] for x in layers),
            "max_entropy": math.log(E),
            "layers": layers,
        }
