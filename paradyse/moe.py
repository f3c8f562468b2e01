"""The mixture-of-experts MLP module of a switchable layer and its `[model.moe]` config.

Storage (`parallel_lib.moe`): rank r of the group holds experts [r E/P, (r+1) E/P) whole, the
shared experts as the dense MLP's column/row shards, and the router replicated. Whole weights
(nn.Linear convention) are `router` (E, H), `expert_gate` and `expert_up` (E F_e, H, expert-major
rows), `expert_down` (H, E F_e), and for shared experts `shared_gate`, `shared_up` (F_s, H) and
`shared_down` (H, F_s).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from parallel_lib import LayerShape
from parallel_lib.moe import MixtureOfExperts, MoeShape, MoeWeights
from parallel_lib.routing import MoeRecorder, RoutingContext

from .mlp import LogicalPart
from .sharding import mark_sharded

__all__ = ["MoeConfig", "MoeMLP", "MoeRecorder", "moe_full_weights"]


@dataclass(frozen=True)
class MoeConfig:
    """`[model.moe]`: the MoE MLP of every layer from `first_dense_layers` on."""

    experts: int = 16
    """Routed experts E (a multiple of sp: each rank holds E/sp whole experts)."""
    top_k: int = 4
    """Experts kept per token."""
    expert_ffn_hidden: int = 64
    """SwiGLU width of one routed expert."""
    shared_experts: int = 0
    """Shared experts every token uses, each of width expert_ffn_hidden (0: none); they run as
    one dense SwiGLU of width shared_experts * expert_ffn_hidden (a multiple of sp)."""
    first_dense_layers: int = 0
    """The first layers keep the dense MLP (as DeepSeek's models do)."""
    normalize_top_k: bool = True
    """Renormalise the kept top-k weights to sum to 1."""
    aux_loss_coef: float = 0.01
    """Load-balancing loss coefficient (per-sequence Switch/GShard form; 0: off)."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (0: off)."""

    def __post_init__(self) -> None:
        for name in ("first_dense_layers", "shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.moe.{name} must be an integer >= 0, got {value!r}")
        self.shape  # noqa: B018  (validates the rest)

    @property
    def shared_ffn_hidden(self) -> int:
        """The shared experts' total SwiGLU width (as `MoeShape` names it)."""
        return self.shared_experts * self.expert_ffn_hidden

    @property
    def shape(self) -> MoeShape:
        shared = self.shared_experts * self.expert_ffn_hidden
        return MoeShape(self.experts, self.top_k, self.expert_ffn_hidden, shared,
                        self.normalize_top_k, self.aux_loss_coef, self.z_loss_coef)  # fmt: skip

    @classmethod
    def from_table(cls, table: dict, coerce=None) -> MoeConfig:
        """From a `[model.moe]` table (values typed by `coerce(key, value, type)` when given);
        an unknown key is refused in one line."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        types = {"int": int, "float": float, "bool": bool}
        for key in table:
            if key not in kinds:
                raise ValueError(
                    f"unknown config key model.moe.{key}; keys of [model.moe]: {', '.join(kinds)}"
                )
        if coerce is not None:
            table = {k: coerce(f"model.moe.{k}", v, types[kinds[k]]) for k, v in table.items()}
        return cls(**table)


def moe_full_weights(
    shape: LayerShape, moe: MoeShape, generator: torch.Generator, dtype=torch.float32
) -> dict[str, Tensor]:
    """Whole MoE weights drawn in float64 from `generator` (independent of P and dtype)."""
    H, E, f, s = shape.hidden, moe.experts, moe.expert_ffn_hidden, moe.shared_ffn_hidden

    def normal(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(cols)

    full = {
        "router": normal(E, H),
        "expert_gate": normal(E * f, H),
        "expert_up": normal(E * f, H),
        "expert_down": torch.cat([normal(H, f) for _ in range(E)], 1),
    }
    if s:
        full |= {
            "shared_gate": normal(s, H),
            "shared_up": normal(s, H),
            "shared_down": normal(H, s),
        }
    return {k: v.to(dtype) for k, v in full.items()}


class MoeMLP(nn.Module):
    """This rank's MoE shards: router (E, H) replicated; experts_gate_up (E/P * 2F_e, H), per
    local expert [gate rows; up rows]; experts_down (E/P * F_e, H), per local expert W_down
    transposed; shared_gate_up (2F_s/P, H) and shared_down (F_s/P, H) like the dense MLP's."""

    def __init__(
        self, shape: LayerShape, P: int, moe: MoeShape, *, dtype, device, layer: int = 0
    ) -> None:
        super().__init__()
        problem = moe.layout_problem(P)
        if problem:
            raise ValueError(f"cannot shard the MoE layer over sp={P}: {problem}")
        self.shape, self.P, self.moe, self.layer = shape, P, moe, layer
        self.kind = MixtureOfExperts(moe)
        kw = {"dtype": dtype, "device": device}
        e, f, s, H = (
            moe.experts // P,
            moe.expert_ffn_hidden,
            moe.shared_ffn_hidden // P,
            shape.hidden,
        )
        self.router = nn.Parameter(torch.empty(moe.experts, H, **kw))
        self.experts_gate_up = mark_sharded(nn.Parameter(torch.empty(e * 2 * f, H, **kw)))
        self.experts_down = mark_sharded(nn.Parameter(torch.empty(e * f, H, **kw)))
        if s:
            self.shared_gate_up = mark_sharded(nn.Parameter(torch.empty(2 * s, H, **kw)))
            self.shared_down = mark_sharded(nn.Parameter(torch.empty(s, H, **kw)))
        else:
            self.shared_gate_up = self.shared_down = None
        self.hook = None
        """The router hook of this layer (`parallel_lib.routing.RouterHook`), None: top-k."""
        self.recorder = None
        """Where the layer reports its auxiliary losses and loads (the model's `MoeRecorder`)."""

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.router]

    def weights(self, batch=None) -> MoeWeights:
        context = None
        if batch is not None:
            layout = batch.layout
            bounds = torch.tensor(layout.bounds[1:], device=layout.device)
            seq_index = torch.searchsorted(bounds, layout.local_natural_index, right=True)
            context = RoutingContext(self.layer, batch.real_mask(), seq_index, batch.seq_lens,
                                     self.hook, self.recorder)  # fmt: skip
        return MoeWeights(self.router, self.experts_gate_up, self.experts_down,
                          self.shared_gate_up, self.shared_down, self.shape, context)  # fmt: skip

    # whole weights <-> this rank's shards ---------------------------------------------
    def shards_of(
        self, full: dict[str, Tensor], shape: LayerShape, P: int, rank: int
    ) -> dict[str, Tensor]:
        """{'router', 'experts_gate_up', 'experts_down'[, 'shared_gate_up', 'shared_down']}."""
        m = self.moe
        e, f = m.experts // P, m.expert_ffn_hidden
        mine = range(rank * e, (rank + 1) * e)
        gate_up = [torch.cat([full["expert_gate"][i * f : (i + 1) * f],
                              full["expert_up"][i * f : (i + 1) * f]]) for i in mine]  # fmt: skip
        out = {
            "router": full["router"],
            "experts_gate_up": torch.cat(gate_up),
            "experts_down": full["expert_down"][:, rank * e * f : (rank + 1) * e * f].t(),
        }
        if m.shared_ffn_hidden:
            s = m.shared_ffn_hidden // P
            rows = slice(rank * s, (rank + 1) * s)
            out["shared_gate_up"] = torch.cat([full["shared_gate"][rows], full["shared_up"][rows]])
            out["shared_down"] = full["shared_down"][:, rows].t()
        return out

    def whole_from(self, shards: list[dict[str, Tensor]], shape: LayerShape) -> dict[str, Tensor]:
        """Inverse of `shards_of` over every rank's shards (rank order)."""
        f = self.moe.expert_ffn_hidden
        gate_up = torch.cat([s["experts_gate_up"] for s in shards]).view(
            -1, 2 * f, self.shape.hidden
        )
        out = {
            "router": shards[0]["router"],
            "expert_gate": gate_up[:, :f].reshape(-1, self.shape.hidden),
            "expert_up": gate_up[:, f:].reshape(-1, self.shape.hidden),
            "expert_down": torch.cat([s["experts_down"] for s in shards]).t(),
        }
        if self.moe.shared_ffn_hidden:
            s = self.moe.shared_ffn_hidden // len(shards)
            gu = [t["shared_gate_up"] for t in shards]
            out["shared_gate"] = torch.cat([t[:s] for t in gu])
            out["shared_up"] = torch.cat([t[s:] for t in gu])
            out["shared_down"] = torch.cat([t["shared_down"] for t in shards]).t()
        return out

    def logical_parts(self, prefix: str) -> dict[str, list[LogicalPart]]:
        m, P = self.moe, self.P
        e, f = m.experts // P, m.expert_ffn_hidden
        parts = {
            "router": [(f"{prefix}router", 0, m.experts, None)],
            "experts_gate_up": [(f"{prefix}experts_gate_up", 0, e * 2 * f, m.experts * 2 * f)],
            "experts_down": [(f"{prefix}experts_down_t", 0, e * f, m.experts * f)],
        }
        if m.shared_ffn_hidden:
            s, S = m.shared_ffn_hidden // P, m.shared_ffn_hidden
            parts["shared_gate_up"] = [(f"{prefix}shared_gate", 0, s, S),
                                       (f"{prefix}shared_up", s, 2 * s, S)]  # fmt: skip
            parts["shared_down"] = [(f"{prefix}shared_down_t", 0, s, S)]
        return parts
