"""ParaDySe: adaptive layer-wise parallel strategy switching for LLM training on dynamic sequences.

The spine: packed batches in the unified layout, the switchable decoder layer (with its pluggable
MLP) and its single-process reference, the model, the engine and trainer, data, checkpoints,
integrations turned on from the config, and the `paradyse-train` CLI. The mesh is
`parallel_lib`'s, re-exported here.
"""

from parallel_lib import Mesh, init_mesh

from .batch import IGNORE_INDEX, PackedBatch
from .config import Config, ConfigError, DataConfig, ParallelConfig, TrainConfig, load_config
from .engine import Engine, LayerHooks, MicroBatchResult, OptimizerWrapper, StepResult
from .head_loss import chunked_head_loss
from .integration import Integration, RunContext
from .layer import SwitchableDecoderLayer, full_from_shards, shard_full_weights
from .mlp import DenseMLP
from .model import (
    DecoderModel,
    ModelConfig,
    VocabParallelEmbedding,
    VocabParallelHead,
    is_sharded,
    mark_sharded,
    token_loss_sum,
)
from .moe import MoeConfig, MoeMLP
from .optim import OptimConfig
from .planning import run_setup
from .reference import ReferenceDecoderLayer, init_full_weights
from .trainer import RunError, Trainer

__all__ = [
    "IGNORE_INDEX",
    "Config",
    "ConfigError",
    "DataConfig",
    "DecoderModel",
    "DenseMLP",
    "Engine",
    "Integration",
    "LayerHooks",
    "Mesh",
    "MicroBatchResult",
    "ModelConfig",
    "MoeConfig",
    "MoeMLP",
    "OptimConfig",
    "OptimizerWrapper",
    "PackedBatch",
    "ParallelConfig",
    "ReferenceDecoderLayer",
    "RunContext",
    "RunError",
    "StepResult",
    "SwitchableDecoderLayer",
    "TrainConfig",
    "Trainer",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "chunked_head_loss",
    "full_from_shards",
    "init_full_weights",
    "init_mesh",
    "is_sharded",
    "load_config",
    "mark_sharded",
    "run_setup",
    "shard_full_weights",
    "token_loss_sum",
]
