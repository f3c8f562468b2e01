"""ParaDySe: adaptive layer-wise parallel strategy switching for LLM training on dynamic sequences.

The spine: the mesh, packed batches in the unified layout, the switchable decoder layer and its
single-process reference, the model, the engine and trainer, data, and the `paradyse-train` CLI.
"""

from .batch import IGNORE_INDEX, PackedBatch
from .config import Config, ConfigError, DataConfig, ParallelConfig, TrainConfig, load_config
from .engine import Engine, LayerHooks, MicroBatchResult, OptimizerWrapper, StepResult
from .layer import SwitchableDecoderLayer, full_from_shards, shard_full_weights
from .mesh import Mesh, init_mesh
from .model import (
    DecoderModel,
    ModelConfig,
    VocabParallelEmbedding,
    VocabParallelHead,
    is_sharded,
    mark_sharded,
    token_loss_sum,
)
from .optim import OptimConfig
from .planning import build_planner
from .reference import ReferenceDecoderLayer, init_full_weights
from .trainer import RunError, Trainer

__all__ = [
    "IGNORE_INDEX",
    "Config",
    "ConfigError",
    "DataConfig",
    "DecoderModel",
    "Engine",
    "LayerHooks",
    "Mesh",
    "MicroBatchResult",
    "ModelConfig",
    "OptimConfig",
    "OptimizerWrapper",
    "PackedBatch",
    "ParallelConfig",
    "ReferenceDecoderLayer",
    "RunError",
    "StepResult",
    "SwitchableDecoderLayer",
    "TrainConfig",
    "Trainer",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "build_planner",
    "full_from_shards",
    "init_full_weights",
    "init_mesh",
    "is_sharded",
    "load_config",
    "mark_sharded",
    "shard_full_weights",
    "token_loss_sum",
]
