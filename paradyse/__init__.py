"""ParaDySe: adaptive layer-wise parallel strategy switching for LLM training on dynamic sequences.

The spine: the mesh, packed batches in the unified layout, the switchable decoder layer and the
single-process reference it is checked against.
"""

from .batch import IGNORE_INDEX, PackedBatch
from .layer import SwitchableDecoderLayer, full_from_shards, shard_full_weights
from .mesh import Mesh, init_mesh
from .reference import ReferenceDecoderLayer, init_full_weights

__all__ = [
    "IGNORE_INDEX",
    "Mesh",
    "PackedBatch",
    "ReferenceDecoderLayer",
    "SwitchableDecoderLayer",
    "full_from_shards",
    "init_full_weights",
    "init_mesh",
    "shard_full_weights",
]
