"""What every strategy accepts and refuses, and the clear errors of bad shapes, names and modes."""

from __future__ import annotations

import re

import pytest
import torch

from paradyse import PackedBatch, SwitchableDecoderLayer
from parallel_lib import RECOMPUTE_MODES, STRATEGY_NAMES, CommGroup, LayerShape, get_strategy

from .harness import run_distributed
from .layer_cases import mesh_for

ALL = ("local", "tp_sp", "ulysses", "ring", "usp", "metp")
ROOMY = LayerShape(hidden=64, heads=16, kv_heads=8, head_dim=16, ffn_hidden=96)
"""Divisible by every P in 1, 2, 4, 8 (and 16 query heads)."""
SIX = LayerShape(hidden=48, heads=12, kv_heads=6, head_dim=8, ffn_hidden=72)
"""Divisible by 1, 2, 3, 6."""


def test_registry_names() -> None:
    assert set(STRATEGY_NAMES) == set(ALL)
    for name in STRATEGY_NAMES:
        assert get_strategy(name).name == name


def expected_support(name: str, P: int) -> bool:
    if name == "local":
        return P == 1
    if name == "usp":  # needs P = inner x outer with both at least 2
        return P in (4, 6, 8)
    return True


@pytest.mark.parametrize(
    ("shape", "P"), [(ROOMY, 1), (ROOMY, 2), (ROOMY, 4), (ROOMY, 8), (SIX, 3), (SIX, 6)]
)
@pytest.mark.parametrize("name", ALL)
def test_accepts_every_divisible_shape(name: str, shape: LayerShape, P: int) -> None:
    ok, reason = get_strategy(name).supports(shape, P)
    assert ok == expected_support(name, P), reason
    if ok:
        assert reason == ""
    else:
        assert reason, "a refusal needs a reason"


# (shape, P, the dimension named, its value, the group sizes that can shard the whole shape)
INDIVISIBLE = [
    (ROOMY, 3, "query heads", 16, [1, 2, 4, 8]),
    (LayerShape(hidden=64, heads=8, kv_heads=2, head_dim=16, ffn_hidden=128), 4,
     "key/value heads", 2, [1, 2]),
    (LayerShape(hidden=64, heads=8, kv_heads=4, head_dim=16, ffn_hidden=130), 4,
     "ffn_hidden", 130, [1, 2]),
    (LayerShape(hidden=64, heads=12, kv_heads=4, head_dim=16, ffn_hidden=96), 8,
     "query heads", 12, [1, 2, 4]),
]  # fmt: skip
INDIVISIBLE_IDS = [f"{w.replace('/', '-').replace(' ', '_')}-P{P}" for _, P, w, _, _ in INDIVISIBLE]
NON_LOCAL = [n for n in ALL if n != "local"]


def suggested_sizes(reason: str) -> list[int]:
    match = re.search(r"choose sp among \[([0-9, ]*)\]", reason)
    assert match, f"no list of group sizes to choose from in: {reason}"
    return [int(p) for p in match.group(1).split(",")]


@pytest.mark.parametrize(("shape", "P", "what", "value", "valid"), INDIVISIBLE, ids=INDIVISIBLE_IDS)
@pytest.mark.parametrize("name", NON_LOCAL)
def test_refuses_indivisible_shape(name, shape, P, what, value, valid) -> None:
    ok, reason = get_strategy(name).supports(shape, P)
    assert not ok
    assert reason.startswith(f"{name}: "), reason
    assert f"{what} ({value})" in reason, reason
    assert f"group size {P}" in reason, reason
    assert "change the model shape" in reason, reason
    assert set(valid) <= set(suggested_sizes(reason)), reason
    # the valid sizes really are valid (the expectation is not a typo)
    for p in valid:
        assert get_strategy("tp_sp").supports(shape, p)[0], p


@pytest.mark.parametrize(("shape", "P", "what", "value", "valid"), INDIVISIBLE, ids=INDIVISIBLE_IDS)
def test_suggested_group_sizes_can_shard_the_shape(shape, P, what, value, valid) -> None:
    """The advice must be followable: every sp the message offers shards the whole layer."""
    _, reason = get_strategy("tp_sp").supports(shape, P)
    assert suggested_sizes(reason) == valid, reason


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_local_refuses_more_than_one_rank(P: int) -> None:
    ok, reason = get_strategy("local").supports(ROOMY, P)
    assert not ok
    assert f"P={P}" in reason and "one rank" in reason and "sp=1" in reason, reason


@pytest.mark.parametrize(("shape", "P"), [(ROOMY, 1), (ROOMY, 2), (SIX, 3)])
def test_usp_refuses_groups_without_a_2d_factorisation(shape: LayerShape, P: int) -> None:
    ok, reason = get_strategy("usp").supports(shape, P)
    assert not ok
    assert f"P={P}" in reason and "inner x outer" in reason, reason
    assert "ulysses or ring" in reason, reason


@pytest.mark.parametrize(
    ("inner", "P", "ok"),
    [(1, 4, False), (3, 4, False), (4, 4, False), (2, 4, True), (2, 8, True), (4, 8, True),
     (8, 8, False), (3, 8, False), (2, 6, True), (3, 6, True), (6, 6, False)],
)  # fmt: skip
def test_usp_explicit_inner(inner: int, P: int, ok: bool) -> None:
    shape = SIX if P == 6 else ROOMY
    strategy = get_strategy("usp", inner=inner)
    got, reason = strategy.supports(shape, P)
    assert got == ok, reason
    if ok:
        assert strategy.inner_degree(P) == inner
    else:
        assert f"inner degree {inner}" in reason and f"P={P}" in reason, reason
        assert "divisor of P between 2 and P/2" in reason, reason
        with pytest.raises(ValueError, match=f"inner degree {inner}"):
            strategy.inner_degree(P)


def test_usp_default_inner_is_largest_divisor_up_to_half() -> None:
    usp = get_strategy("usp")
    assert [usp.inner_degree(P) for P in (4, 6, 8, 9, 12)] == [2, 3, 4, 3, 6]


@pytest.mark.parametrize("name", ALL)
def test_nonpositive_group_refused(name: str) -> None:
    ok, reason = get_strategy(name).supports(ROOMY, 0)
    assert not ok and ("P=0" in reason or "got 0" in reason), reason


@pytest.mark.parametrize("name", ALL)
def test_check_raises_the_reason(name: str) -> None:
    strategy = get_strategy(name)
    ok, reason = strategy.supports(ROOMY, 3)
    assert not ok
    with pytest.raises(ValueError) as info:
        strategy.check(ROOMY, 3)
    assert str(info.value) == reason


def test_unknown_strategy_name() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'zigzag'") as info:
        get_strategy("zigzag")
    for name in ALL:
        assert name in str(info.value)


def test_unknown_strategy_and_recompute_in_layer_forward() -> None:
    shape = LayerShape(hidden=16, heads=4, kv_heads=2, head_dim=4, ffn_hidden=32)
    layer = SwitchableDecoderLayer(shape, CommGroup.single(), dtype=torch.float64)
    batch = PackedBatch.pack([[1, 2, 3], [4, 5]], 1, 0)
    x = torch.randn(batch.local_tokens, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown strategy 'zigzag'"):
        layer(x, batch, "zigzag")
    with pytest.raises(ValueError, match="unknown recompute mode 'partial'") as info:
        layer(x, batch, "local", "partial")
    for mode in RECOMPUTE_MODES:
        assert mode in str(info.value)


# ---------------------------------------------------------------------------- LayerShape


def test_layer_shape_kv_heads_must_divide_heads() -> None:
    with pytest.raises(ValueError, match=r"heads \(8\) must be a multiple of kv_heads \(3\)"):
        LayerShape(hidden=64, heads=8, kv_heads=3, head_dim=16, ffn_hidden=128)


def test_layer_shape_head_dim_must_be_even() -> None:
    with pytest.raises(ValueError, match="head_dim must be even.*15"):
        LayerShape(hidden=64, heads=8, kv_heads=4, head_dim=15, ffn_hidden=128)


@pytest.mark.parametrize("field", ["hidden", "heads", "kv_heads", "head_dim", "ffn_hidden"])
def test_layer_shape_fields_must_be_positive(field: str) -> None:
    dims = {"hidden": 64, "heads": 8, "kv_heads": 4, "head_dim": 16, "ffn_hidden": 128}
    dims[field] = 0
    with pytest.raises(ValueError, match=f"LayerShape.{field} must be positive"):
        LayerShape(**dims)


# ---------------------------------------------------------------------------- layer on 2 ranks
# A CommGroup of more than one rank refuses to exist without a process group, so the layer's
# construction checks run on a real group of 2.


def layer_construction_case() -> None:
    group = mesh_for().sp_group
    assert group.size == 2
    bad = LayerShape(hidden=32, heads=6, kv_heads=3, head_dim=8, ffn_hidden=64)
    try:
        SwitchableDecoderLayer(bad, group)
    except ValueError as e:
        msg = str(e)
        assert "sp=2" in msg and "key/value heads (3)" in msg and "choose sp among" in msg, msg
    else:
        raise AssertionError("a layer with 3 kv heads was sharded over 2 ranks")

    good = LayerShape(hidden=32, heads=4, kv_heads=2, head_dim=8, ffn_hidden=64)
    layer = SwitchableDecoderLayer(good, group)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes["attn_qkv"] == ((2 + 2 * 1) * 8, 32)  # 2 q heads, 1 k and 1 v head per rank
    assert shapes["attn_out"] == (2 * 8, 32)
    assert shapes["mlp.gate_up"] == (2 * 32, 32)
    assert shapes["mlp.down"] == (32, 32)
    assert shapes["attn_norm.weight"] == (32,) and shapes["mlp_norm.weight"] == (32,)

    batch = PackedBatch.pack([[1, 2, 3, 4, 5]], 2, group.rank)
    x = torch.randn(batch.local_tokens, 32, generator=torch.Generator().manual_seed(1))
    for name, words in (("local", "one rank"), ("usp", "inner x outer")):
        try:
            layer(x, batch, name)
        except ValueError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{name} ran on 2 ranks")


def test_layer_construction_on_two_ranks() -> None:
    run_distributed(2, layer_construction_case)


def test_comm_group_of_two_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="needs a process group"):
        CommGroup(pg=None, ranks=(0, 1), rank=0)
    with pytest.raises(ValueError, match="rank 1 outside a group of 1"):
        CommGroup(pg=None, ranks=(0,), rank=1)
