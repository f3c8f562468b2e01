"""The options a layer can run (strategy x factorisation x recompute) and their cost tables.

`LayerCosts` prices every option of every layer for a micro-batch through the cost model and
caches the tables by the batch's length signature, so that several planners (the exact one and
the baselines, in benchmarks) share one set of cost-model calls.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cost_models import RECOMPUTE_MODES, STRATEGIES, logits_bytes
from cost_models.counts import PRICED_RECOMPUTES, check_config, pad_length
from cost_models.group_size import (
    assign_sequences,
    group_layer_cost,
    runs_on_sub_groups,
    sequence_costs,
)

__all__ = ["Option", "LayerCosts", "CostTables", "enumerate_options", "config_supports"]


@dataclass(frozen=True)
class Option:
    """One way to run a layer: a strategy (with usp's inner x outer split) and a recompute mode,
    on the whole sp group or, with `group`, on sub-groups of that many ranks."""

    strategy: str
    recompute: str = "none"
    inner: int | None = None
    """usp only: the all-to-all degree u (the ring runs across P/u)."""
    outer: int | None = None
    """usp only: the ring degree P/u."""
    group: int | None = None
    """g < P: the micro-batch runs as P/g sub-groups of g ranks, each on its own sequences
    (`parallel_lib.group_size`); None: on the whole group. Every layer of a plan has the same."""

    @property
    def name(self) -> str:
        """'tp_sp', 'ring+full', 'usp2x4+selective' (u x c), 'g1:local' (on sub-groups of 1):
        the label plans print."""
        base = self.strategy + (f"{self.inner}x{self.outer}" if self.inner else "")
        base = base if self.group is None else f"g{self.group}:{base}"
        return base if self.recompute == "none" else f"{base}+{self.recompute}"

    @property
    def fixed_label(self) -> str:
        """The name with its recompute mode always written ('tp_sp+none', 'g2:ring+full'): the
        label of the static method that runs exactly this option (a label without a mode lets
        the static method pick the mode)."""
        return self.name if self.recompute != "none" else f"{self.name}+none"

    def __str__(self) -> str:
        return self.name


Supports = Callable[[Option, object, int], tuple[bool, str]]


def config_supports(option: Option, shape, P: int) -> tuple[bool, str]:
    """The cost model's own check (`cost_models.counts.check_config`): what the strategy library
    refuses. The engine passes parallel_lib's `Strategy.supports` instead."""
    try:
        check_config(shape, option.strategy, P, option.recompute, option.inner)
    except ValueError as error:
        return False, str(error)
    return True, ""


def enumerate_options(
    shape,
    P: int,
    strategies: Sequence[str] | None = None,
    recomputes: Sequence[str] | None = None,
    supports: Supports = config_supports,
    group_sizes: Sequence[int] = (),
) -> list[Option]:
    """Every option `supports` allows, in a fixed order (strategies as given, usp once per split
    u x c with u, c >= 2, then recompute modes), then, for each sub-group size g < P in
    `group_sizes`, the strategies that run on g ranks (usp not: a sub-group has no 2-D
    factorisation). ValueError, one line with the reasons, if none on the whole group. The
    default recompute modes are the engine's (`cost_models.RECOMPUTE_MODES`); METP's own
    `projections` is priced when asked for (`cost_models.counts.PRICED_RECOMPUTES`)."""
    strategies = tuple(strategies or STRATEGIES)
    recomputes = tuple(recomputes or RECOMPUTE_MODES)
    for name, given, known in (("strategy", strategies, STRATEGIES),
                               ("recompute mode", recomputes, PRICED_RECOMPUTES)):  # fmt: skip
        unknown = [x for x in given if x not in known]
        if unknown:
            raise ValueError(f"unknown {name} {unknown[0]!r}; choose from {', '.join(known)}")
    options, refused = [], {}
    for strategy in strategies:
        splits = [(u, P // u) for u in range(2, P // 2 + 1) if P % u == 0 and P // u >= 2]
        for inner, outer in splits if strategy == "usp" else [(None, None)]:
            for recompute in recomputes:
                option = Option(strategy, recompute, inner, outer)
                ok, reason = supports(option, shape, P)
                if ok:
                    options.append(option)
                else:
                    refused.setdefault(strategy, reason)
        if strategy == "usp" and not splits:
            refused[strategy] = f"usp needs P = inner x outer with both at least 2, got P={P}"
    if not options:
        by_reason: dict[str, list[str]] = {}
        for strategy, reason in refused.items():
            by_reason.setdefault(reason.removeprefix(f"{strategy}: "), []).append(strategy)
        reasons = "; ".join(f"{', '.join(s)}: {r}" for r, s in by_reason.items())
        sizes = [p for p in range(1, shape.kv_heads + 1) if not (
            shape.heads % p or shape.kv_heads % p or shape.ffn_hidden % p)]  # fmt: skip
        raise ValueError(
            f"no strategy can run this layer on sp={P} ({reasons}); choose sp among {sizes}"
        )
    for g in sorted({int(g) for g in group_sizes if 0 < g < P and P % g == 0}, reverse=True):
        for strategy in STRATEGIES if g == 1 else strategies:
            if not runs_on_sub_groups(strategy, g):
                continue
            for recompute in recomputes:
                option = Option(strategy, recompute, group=g)
                if supports(option, shape, g)[0]:
                    options.append(option)
    return options


@dataclass(frozen=True)
class CostTables:
    """One micro-batch's costs: (layers, options) arrays of one rank."""

    signature: tuple[int, ...]
    """Sorted padded sequence lengths: the batch's length signature."""
    time: np.ndarray
    """Forward + backward seconds."""
    saved: np.ndarray
    """Bytes saved for the backward."""
    transient: np.ndarray
    """Bytes beyond every layer's saved bytes at the layer's worst moment, never less than the
    LM head's logits (one more transient, live while every layer's saved bytes are)."""
    head_bytes: int
    frozen: frozenset[int] = frozenset()
    """Layers priced as frozen (no weight gradients)."""


class LayerCosts:
    """Cost tables of `layers` decoder layers on one rank of an sp group of P, for the given
    options, cached (least recently used) by length signature and frozen layers. Each layer is
    priced by its own row: a dense or a mixture-of-experts layer's (`moe_layers`, of shape
    `moe`, priced for uniform routing), trainable or frozen (no weight-gradient matmuls, no
    weight-gradient collectives, fewer saved bytes); equal rows are priced once."""

    def __init__(
        self,
        model,
        shape,
        layers: int,
        P: int,
        options: Sequence[Option],
        *,
        dtype: str = "float32",
        vocab: int = 0,
        nodes_spanned: int = 1,
        cache_size: int = 4096,
        moe=None,
        moe_layers: Sequence[int] = (),
        logits_chunk: int = 0,
    ) -> None:
        if layers < 1:
            raise ValueError(f"the model needs at least one layer, got {layers}")
        self.model, self.shape, self.layers, self.P = model, shape, layers, P
        self.moe = moe
        self.moe_layers = self.check_layers(moe_layers, "MoE")
        """Layers with the mixture-of-experts MLP `moe` (a `parallel_lib.moe.MoeShape` or
        anything with its fields)."""
        if self.moe_layers and moe is None:
            raise ValueError("MoE layers need the MoE shape (moe=...)")
        self.options = list(options)
        self.dtype, self.vocab, self.nodes_spanned = dtype, vocab, nodes_spanned
        self.cache_size = cache_size
        self.logits_chunk = logits_chunk
        """Tokens per chunk of the loss's logits (`cost_models.logits_bytes`; 0: whole logits)."""
        self._cache: OrderedDict[tuple, CostTables] = OrderedDict()

    def signature(self, seq_lens: Sequence[int]) -> tuple[int, ...]:
        """What the costs depend on: the lengths as the layout pads them, in sorted order."""
        if not seq_lens:
            raise ValueError("a micro-batch needs at least one sequence")
        return tuple(sorted(pad_length(int(n), self.P) for n in seq_lens))

    def check_layers(self, indices, what: str = "frozen") -> frozenset[int]:
        """`indices` as a set of layer indices; ValueError, one line, for one out of range."""
        chosen = frozenset(int(i) for i in indices)
        bad = sorted(i for i in chosen if not 0 <= i < self.layers)
        if bad:
            raise ValueError(f"{what} layers {bad} outside the model's {self.layers} layers")
        return chosen

    def sub_groups(self, seq_lens: Sequence[int], g: int) -> list[list[int]]:
        """Indices of the sequences each of the P/g sub-groups of g ranks trains, dealt by
        predicted cost (`cost_models.group_size.assign_sequences`; the engine deals them by
        this same call). With fewer sequences than sub-groups the last are empty: they train
        `cost_models.group_size.IDLE_LENGTHS`."""
        return assign_sequences(sequence_costs(self.shape, seq_lens), self.P // g)

    def _cost(self, option: Option, key: tuple[int, ...], trainable: bool, moe: bool):
        kw = {"dtype": self.dtype, "inner": option.inner, "nodes_spanned": self.nodes_spanned,
              "trainable": trainable}  # fmt: skip
        if option.group is None:
            extra = {"moe": self.moe} if moe else {}
            return self.model.layer_cost(self.shape, option.strategy, option.recompute, key,
                                         self.P, **kw, **extra)  # fmt: skip
        if moe:  # a MoE layer runs on the whole group
            return None
        members = self.sub_groups(key, option.group)
        lens = [[key[i] for i in m] for m in members]
        return group_layer_cost(self.model, self.shape, option.strategy, option.recompute, lens,
                                self.P, **kw)  # fmt: skip

    def _head_bytes(self, key: tuple[int, ...], g: int | None) -> float:
        """The LM head's logits on one rank: of T/P tokens, or on sub-groups of g, of the
        most loaded sub-group's tokens / g."""
        if not self.vocab:
            return 0.0
        if g is None:
            return logits_bytes(sum(key), self.vocab, self.P, self.logits_chunk)
        members = self.sub_groups(key, g)
        return max(logits_bytes(sum(pad_length(key[i], g) for i in m), self.vocab, g,
                                self.logits_chunk) for m in members)  # fmt: skip

    def _row(self, key: tuple[int, ...], trainable: bool, moe: bool) -> tuple[list, list, list]:
        """(time, saved, transient) of every option for one layer (a MoE layer's: `moe`); an
        option that cannot run this batch costs inf."""
        row_t, row_m, row_tr = [], [], []
        for option in self.options:
            cost = self._cost(option, key, trainable, moe)
            row_t.append(math.inf if cost is None else cost.time_s)
            row_m.append(math.inf if cost is None else cost.saved_bytes)
            row_tr.append(math.inf if cost is None else cost.transient_bytes)
        return row_t, row_m, row_tr

    def tables(self, seq_lens: Sequence[int], frozen: frozenset[int] = frozenset()) -> CostTables:
        """The tables of a micro-batch of these lengths with the `frozen` layers frozen."""
        key = self.signature(seq_lens)
        frozen = self.check_layers(frozen)
        found = self._cache.get((key, frozen))
        if found is not None:
            self._cache.move_to_end((key, frozen))
            return found
        kinds = [(i not in frozen, i in self.moe_layers) for i in range(self.layers)]
        rows = {kind: self._row(key, *kind) for kind in dict.fromkeys(kinds)}
        head = logits_bytes(sum(key), self.vocab, self.P, self.logits_chunk) if self.vocab else 0
        heads = np.array([self._head_bytes(key, o.group) for o in self.options], np.float64)
        per_layer = [rows[kind] for kind in kinds]

        def stack(k: int) -> np.ndarray:
            return np.array([row[k] for row in per_layer], dtype=np.float64)

        tables = CostTables(
            signature=key,
            time=stack(0),
            saved=stack(1),
            transient=np.maximum(stack(2), heads),
            head_bytes=head,
            frozen=frozen,
        )
        self._cache[(key, frozen)] = tables
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tables
