"""`cost_models.strategy_costs`: what the cost model copies from `parallel_lib` (names, modes,
padding, each strategy's factorisation and the configurations it accepts) equals the library's,
and the registry holds exactly one description per strategy. Pure Python apart from the
reference values."""

from __future__ import annotations

import inspect

import pytest

import parallel_lib
from cost_models.counts import (
    RECOMPUTE_MODES,
    STRATEGIES,
    check_config,
    factorisation,
    pad_length,
)
from cost_models.strategy_costs import STRATEGY_COSTS, StrategyCost, Zero3Cost, strategy_cost
from parallel_lib import LayerShape, get_strategy
from parallel_lib.strategies.zero3 import Zero3Strategy

SHAPES = [
    LayerShape(64, 8, 4, 16, 128),
    LayerShape(96, 6, 6, 16, 192),
    LayerShape(64, 16, 8, 16, 96),
    LayerShape(48, 12, 6, 8, 72),
    LayerShape(64, 8, 2, 16, 128),
    LayerShape(64, 8, 4, 16, 130),
    LayerShape(64, 12, 4, 16, 96),
    LayerShape(64, 32, 16, 8, 480),
]
GROUPS = range(0, 17)


def test_copied_names_and_modes_equal_the_library() -> None:
    assert STRATEGIES == parallel_lib.STRATEGY_NAMES  # same order too
    assert RECOMPUTE_MODES == parallel_lib.RECOMPUTE_MODES


def test_pad_length_equals_the_library() -> None:
    lengths = [*range(1, 260), 1000, 4095, 4096, 4097, 131_071, 131_072]
    for P in range(1, 17):
        for n in lengths:
            assert pad_length(n, P) == parallel_lib.pad_length(n, P), (n, P)
    for bad in (0, -3):
        with pytest.raises(ValueError):
            pad_length(bad, 2)


def shape_for(P: int) -> LayerShape:
    """A shape every strategy can shard over P ranks."""
    return LayerShape(hidden=64, heads=2 * P, kv_heads=P, head_dim=8, ffn_hidden=4 * P)


@pytest.mark.parametrize("name", ["ulysses", "ring", "usp"])
def test_zero3_factorisation_equals_the_library(name: str) -> None:
    inners = [None] + (list(range(0, 18)) if name == "usp" else [])
    for P in range(1, 17):
        for inner in inners:
            strategy = get_strategy(name, **({} if inner is None else {"inner": inner}))
            if not strategy.supports(shape_for(P), P)[0]:
                with pytest.raises(ValueError):
                    factorisation(name, P, inner)
                continue
            u = strategy.inner_degree(P)
            assert factorisation(name, P, inner) == (u, P // u), (P, inner)


def test_other_factorisations_follow_their_attention() -> None:
    """local and tp_sp attend whole sequences with no ring (u = P, c = 1); metp runs ring
    attention over the whole group (u = 1, c = P). parallel_lib has no degree to ask here."""
    for P in range(1, 17):
        assert factorisation("tp_sp", P) == (P, 1)
        assert factorisation("metp", P) == (1, P)
    assert factorisation("local", 1) == (1, 1)


@pytest.mark.parametrize("name", parallel_lib.STRATEGY_NAMES)
def test_config_check_accepts_exactly_what_the_library_supports(name: str) -> None:
    for shape in SHAPES:
        for P in GROUPS:
            for inner in [None] + (list(range(0, P + 2)) if name == "usp" else []):
                options = {} if inner is None else {"inner": inner}
                supported, reason = get_strategy(name, **options).supports(shape, P)
                try:
                    check_config(shape, name, P, "none", inner)
                    accepted, refusal = True, ""
                except ValueError as error:
                    accepted, refusal = False, str(error)
                assert accepted == supported, (shape, P, inner, reason, refusal)
                assert "\n" not in refusal


def test_every_strategy_has_exactly_one_description() -> None:
    assert tuple(STRATEGY_COSTS) == parallel_lib.STRATEGY_NAMES
    for name, cost in STRATEGY_COSTS.items():
        assert cost.name == name and strategy_cost(name) is cost
    classes = [type(cost) for cost in STRATEGY_COSTS.values()]
    assert len(set(classes)) == len(classes)

    def concrete(cls: type) -> set[type]:
        found = {cls} if not inspect.isabstract(cls) else set()
        for sub in cls.__subclasses__():
            found |= concrete(sub)
        return found

    assert concrete(StrategyCost) == set(classes)  # no description left out of the registry
    with pytest.raises(ValueError, match="unknown strategy 'sideways'; choose from local, tp_sp"):
        strategy_cost("sideways")


@pytest.mark.parametrize("name", parallel_lib.STRATEGY_NAMES)
def test_descriptions_agree_with_the_library_structure(name: str) -> None:
    """The ZeRO-3 family is the library's; ring attention is what keeps sequences split."""
    cost, strategy = strategy_cost(name), get_strategy(name)
    assert isinstance(cost, Zero3Cost) == isinstance(strategy, Zero3Strategy)
    assert cost.has_ring == (not strategy.holds_whole_sequences)
