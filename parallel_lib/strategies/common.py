"""Attention over gathered tokens, shared by every strategy."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..attention import varlen_attention
from ..groups import CommGroup
from ..layout import ZigzagLayout
from ..ops import apply_rotary, split_qkv
from ..ring_attention import ring_attention
from ..shape import LayerShape


def attend_gathered(
    y: Tensor,
    layout: ZigzagLayout,
    shape: LayerShape,
    P: int,
    members: Sequence[int],
    blocks: int,
    ring_group: CommGroup | None,
    backend: str,
) -> Tensor:
    """Attention of local heads over the tokens of `members`, spread zigzag over `ring_group`
    (None: the members' tokens are whole sequences, no ring).

    y (N, blocks * qkv_rows) is the fused projection of the members' tokens (concatenated in
    member order) for `blocks` rank shards of heads. Returns o (N, blocks*heads/P*d), same order.
    """
    q, k, v = split_qkv(y, blocks, shape, P)
    positions, to_sorted, from_sorted = layout.gathered(members)
    tables = layout.rotary(members, shape.head_dim, shape.rope_theta, shape.rope_scaling, q.dtype)
    q = apply_rotary(q, positions, shape.rope_theta, tables=tables)
    k = apply_rotary(k, positions, shape.rope_theta, tables=tables)
    if len(members) > 1:  # sort by natural index: natural order, or the outer ring's zigzag
        q, k, v = (t.index_select(0, to_sorted) for t in (q, k, v))
    if ring_group is None:
        o = varlen_attention(q, k, v, layout.bounds, backend=backend)
    else:
        bounds = [b // ring_group.size for b in layout.bounds]
        o = ring_attention(q, k, v, bounds, ring_group, backend=backend)
    if len(members) > 1:
        o = o.index_select(0, from_sorted)
    return o.flatten(1)
