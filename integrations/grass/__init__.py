"""GRASS: gradient-based adaptive layer-wise importance sampling for fine-tuning (SEEDS, seed 2),
on the engine's seams only: an `OptimizerWrapper` that says which layers train in a step, which
steps only probe, where each layer's optimizer state lives, and reads every step's per-layer
gradient norms; and a checkpointed state. Turn it on from the config alone:

    [integrations.grass]
    gamma = 2          # layers updated at a time
    probe_steps = 2    # gradient-only steps that measure every layer's MGN first
    period = 4         # steps between draws
    tau = 1.0          # softmax temperature (relative to the mean MGN by default)
    alpha = 0.5        # EMA weight of a drawn layer's new window
    mode = "grass"     # grass | static | uniform (LISA) | full
    offload = true     # frozen layers' optimizer state in host memory

See docs/grass.md for the algorithm, the modes and what each option costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from paradyse.integration import Integration, RunContext
from paradyse.sharding import is_sharded

from .sampler import MeanGradientNorms, sampling_probabilities
from .wrapper import MODES, Grass

__all__ = [
    "MODES",
    "Grass",
    "MeanGradientNorms",
    "Options",
    "plug_in",
    "sampling_probabilities",
]


@dataclass(frozen=True)
class Options:
    """The keys of [integrations.grass]."""

    gamma: int = 2
    """Switchable layers updated at a time (1 to the model's layers)."""
    probe_steps: int = 2
    """First steps: every layer's gradient is measured, nothing is updated (not in uniform/full)."""
    period: int = 4
    """Steps between draws (T_u): a drawn set trains this many steps."""
    tau: float = 1.0
    """Softmax temperature of the sampling probabilities softmax(MGN / tau)."""
    relative_tau: bool = True
    """tau in units of the mean MGN (scale-free); false: tau in MGN's own units (the paper's)."""
    alpha: float = 0.5
    """EMA weight of a drawn layer's newest window in its MGN (0: never refreshed, 1: replaced)."""
    min_prob: float = 0.0
    """Probability floor per layer (mixed with uniform), so that no layer starves; 0: off."""
    mode: str = "grass"
    """grass, static (probing MGN only), uniform (LISA: uniform draws), full (every layer)."""
    offload: bool = True
    """Keep the optimizer state of layers not drawn in host memory (pinned on CUDA)."""
    reset_state: bool = False
    """Forget a layer's optimizer state when it leaves the drawn set (as BAdam); false: keep it."""
    train_embeddings: bool = True
    """Train the embedding, the head and the final norm every step (LISA does); false: frozen."""
    seed: int = -1
    """Seed of the draws (-1: the run's train.seed)."""

    def __post_init__(self) -> None:
        checks = (
            ("gamma", self.gamma >= 1, "at least 1"),
            ("probe_steps", self.probe_steps >= 0, ">= 0"),
            ("period", self.period >= 1, "at least 1"),
            ("tau", self.tau > 0, "> 0"),
            ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
            ("min_prob", self.min_prob >= 0, ">= 0"),
            ("mode", self.mode in MODES, " | ".join(MODES)),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"grass.{key} must be {allowed}, got {getattr(self, key)!r}")


def layer_numels(layer, P: int) -> int:
    """A layer's whole parameter count: its shards times P, its replicated weights once."""
    return sum(p.numel() * (P if is_sharded(p) else 1) for p in layer.parameters())


def plug_in(options: Options, run: RunContext) -> Integration:
    layers = run.model.switchable_layers()
    if options.gamma > len(layers):
        raise ValueError(f"grass.gamma {options.gamma} exceeds the model's {len(layers)} layers")
    if options.min_prob * len(layers) > 1:
        raise ValueError(f"grass.min_prob {options.min_prob} x {len(layers)} layers exceeds 1")
    if not options.train_embeddings:
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        for p in run.model.parameters():
            if id(p) not in in_layers:
                p.requires_grad_(False)  # never trained: the engine gives them no optimizer state
    numels = [layer_numels(layer, run.mesh.sp) for layer in layers]
    seed = run.seed if options.seed < 0 else options.seed
    grass = Grass(options, numels, seed)
    return Integration(optimizer_wrapper=grass, state=grass)
