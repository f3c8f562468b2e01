"""Shared pieces for tests of the switchable layer: cached meshes, inputs, the reference."""

from __future__ import annotations

import torch
from torch import Tensor

import paradyse
from paradyse import (
    PackedBatch,
    ReferenceDecoderLayer,
    SwitchableDecoderLayer,
    init_full_weights,
    shard_full_weights,
)
from parallel_lib import STRATEGY_NAMES, LayerShape, get_strategy

SHAPE = LayerShape(hidden=64, heads=8, kv_heads=4, head_dim=16, ffn_hidden=128)

_MESHES: dict[int, paradyse.Mesh] = {}


def mesh_for(sp: int | None = None) -> paradyse.Mesh:
    """init_mesh once per worker process and sp (group creation is collective and not free)."""
    key = sp or 0
    if key not in _MESHES:
        _MESHES[key] = paradyse.init_mesh(sp)
    return _MESHES[key]


def uneven_lengths(P: int) -> list[int]:
    """Packed causal sequences of uneven lengths: a single token, one shorter than 2P, one not a
    multiple of 2P, a prime length, one long."""
    return [1, max(2, 2 * P - 1), 4 * P + 3, 37, 16 * P]


class Case:
    """One random problem: whole weights, per-sequence inputs and output gradients, float64."""

    def __init__(self, lens: list[int], seed: int = 0, shape: LayerShape = SHAPE, layers: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.lens = shape, lens
        self.full = [init_full_weights(shape, g, torch.float64) for _ in range(layers)]
        self.tokens = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
        self.xs = [torch.randn(n, shape.hidden, generator=g, dtype=torch.float64) for n in lens]
        self.dys = [torch.randn(n, shape.hidden, generator=g, dtype=torch.float64) for n in lens]

    def reference(self, strategies_per_layer: int | None = None):
        """Outputs, input gradients and per-layer weight gradients of the reference stack."""
        layers = [ReferenceDecoderLayer(self.shape, f) for f in self.full]
        xs = [x.clone().requires_grad_() for x in self.xs]
        h = xs
        for layer in layers:
            h = layer(h)
        torch.autograd.backward(h, self.dys)
        return [t.detach() for t in h], [x.grad for x in xs], [layer.grads() for layer in layers]

    def batch(self, mesh: paradyse.Mesh) -> PackedBatch:
        return PackedBatch.pack(self.tokens, mesh.sp, mesh.sp_rank)

    def local(self, batch: PackedBatch, per_sequence: list[Tensor]) -> Tensor:
        """Per-sequence tensors -> this rank's (T/P, H) rows; padding rows are zero."""
        natural = per_sequence[0].new_zeros(batch.total_tokens, per_sequence[0].shape[1])
        for start, t in zip(batch.layout.bounds, per_sequence, strict=False):
            natural[start : start + t.shape[0]] = t
        return batch.layout.shard(natural)

    def layers(self, mesh: paradyse.Mesh, dtype: torch.dtype) -> list[SwitchableDecoderLayer]:
        out = []
        for full in self.full:
            layer = SwitchableDecoderLayer(self.shape, mesh.sp_group, dtype=dtype)
            layer.load_full_weights({k: v.to(dtype) for k, v in full.items()})
            out.append(layer)
        return out

    def expected_shards(self, grads: dict[str, Tensor], P: int, rank: int) -> dict[str, Tensor]:
        """Whole-weight gradients cut to rank `rank`'s shards."""
        return shard_full_weights(grads, self.shape, P, rank)


def assert_close(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """Elementwise |a - e| <= rel * max|e| (+ rel * |e|): relative to the tensor's scale, so
    entries near zero after cancellation do not make float32 look wrong."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected,
        rtol=rel,
        atol=rel * float(scale),
        msg=lambda m: f"{what}: {m}",
    )


def rel_error(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


def supported(P: int, shape: LayerShape = SHAPE) -> list[str]:
    """Strategies the library runs on a group of P for `shape`."""
    return [n for n in STRATEGY_NAMES if get_strategy(n).supports(shape, P)[0]]


def problem(mesh, lens: list[int], dtype: torch.dtype = torch.float32):
    """This rank's packed batch of random tokens, a random input requiring grad and an output
    gradient, all in the batch's layout."""
    tokens = [torch.randint(0, 256, (n,)).tolist() for n in lens]
    batch = PackedBatch.pack(tokens, mesh.sp, mesh.sp_rank)
    x = torch.randn(batch.local_tokens, SHAPE.hidden, dtype=dtype, requires_grad=True)
    return batch, x, torch.randn(batch.local_tokens, SHAPE.hidden, dtype=dtype)


class RankStandIn:
    """A stand-in group: rank `rank` of `size`, for building one rank's shards without
    processes (nothing communicates while a model is built or loaded)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
