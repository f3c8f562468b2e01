"""The engine (DESIGN 8): per micro-batch pack -> plan -> forward/backward with each layer's
strategy and recompute mode; per step reduce, clip and step the optimizer.

The loss of every micro-batch is summed over tokens and divided by the global token count of the
step, so gradients (and the logged loss) do not depend on P, dp or how the step was cut into
micro-batches. Integrations plug into two seams and never patch the engine: `LayerHooks` (before
and after each layer's forward, after its backward) and an `OptimizerWrapper` (which layers train
in a step, where each layer's optimizer state lives between steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cost_models.group_size import IDLE_LENGTHS
from parallel_lib import CommGroup, GroupSplit, Strategy, all_gather_dim0, get_strategy, split_group
from parallel_lib.mesh import Mesh
from planners import Option, Plan, Planner

from .batch import PackedBatch
from .memory import PeakMemory
from .moe_metrics import MoeStepStats
from .optim import (
    FlatUnit,
    OptimConfig,
    UnitOptimizer,
    learning_rate,
    reduce_replicated,
    reduce_replicated_with_norms,
)
from .seams import AttachedHooks, LayerHooks, OptimizerWrapper

__all__ = ["Engine", "LayerHooks", "OptimizerWrapper", "StepResult", "MicroBatchResult"]

IDLE_SEQUENCE = (~0,) * IDLE_LENGTHS[0]
"""What a sub-group dealt no sequence trains: token id 0 marked as having no target (`~id`,
`PackedBatch.pack`), as long as the `cost_models.group_size.IDLE_LENGTHS` the planner priced.
Layer hooks see it like any batch (its `num_loss_tokens` is 0)."""


@dataclass
class MicroBatchResult:
    seq_lens: tuple[int, ...]
    plan: Plan
    loss_sum: float
    """This rank's summed token loss."""


@dataclass
class StepResult:
    """One optimizer step, reduced over the whole world (every rank gets the same numbers except
    `micro_batches`, which are this rank's dp group's)."""

    step: int
    loss: float
    """Mean token loss of the global batch."""
    loss_tokens: int
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """0 when the step was skipped."""
    skipped: bool
    """True when the gradient norm was not finite: no update was made (gradients dropped)."""
    layer_grad_norms: list[float | None]
    """Per switchable layer, the global norm of its gradient (over sp and dp) before clipping;
    None for a layer frozen in this step."""
    step_s: float
    """Measured seconds of the slowest rank."""
    predicted_s: float
    """Cost-model seconds of the layers, forward + backward, of the slowest dp group."""
    peak_bytes: int
    """Measured peak of the most loaded rank (0 when not measured)."""
    predicted_peak_bytes: int
    """The planner's predicted peak of the most loaded rank (static + saved + transient)."""
    optimizer_state_bytes: int = 0
    """AdamW state the optimizers hold on the device after the step (the most loaded rank);
    state parked in host memory is not counted."""
    micro_batches: list[MicroBatchResult] = field(default_factory=list)
    updated: bool = True
    """False for a step the optimizer wrapper made gradient-only (`OptimizerWrapper.updates`)."""
    moe: dict | None = None
    """MoE layers' expert loads, their entropy and auxiliary losses (`MoeStepStats.reduce`);
    None for a dense model."""


class Engine:
    """Trains `model` (built from switchable layers: `model.switchable_layers()`, `model(batch)`
    -> this rank's summed token loss) on `mesh`, with `planner` choosing every layer's option
    per micro-batch. Collective: every rank of the mesh constructs it and calls `step`."""

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        planner: Planner,
        optim: OptimConfig | None = None,
        *,
        total_steps: int,
        hooks: Sequence[LayerHooks] = (),
        optimizer_wrapper: OptimizerWrapper | None = None,
        router_hook=None,
        measure_memory: bool = True,
    ) -> None:
        self.model, self.mesh, self.planner = model, mesh, planner
        self.optim_config = optim or OptimConfig()
        self.total_steps, self.measure_memory = total_steps, measure_memory
        self.hooks, self.wrapper = list(hooks), optimizer_wrapper or OptimizerWrapper()
        self.layers = list(model.switchable_layers())
        if len(self.layers) != planner.costs.layers:
            raise ValueError(
                f"the planner plans {planner.costs.layers} layers, the model has "
                f"{len(self.layers)} switchable layers"
            )
        self.units, self.unit_layers = self._units()
        self.optimizers = [
            UnitOptimizer(u, self.optim_config, sp_group=mesh.sp_group, dp_group=mesh.dp_group)
            for u in self.units
        ]
        self.moe_stats = MoeStepStats(model)
        if router_hook is not None:
            self._install_router_hook(router_hook)
        self._strategies: dict[Option, Strategy] = {}
        self._splits: dict[int, GroupSplit] = {}  # sub-group size -> this rank's place
        self.step_index = 0
        self._attached = AttachedHooks(self.hooks, self.layers)
        self._world = (
            CommGroup(dist.group.WORLD, tuple(range(mesh.world)), mesh.rank)
            if mesh.world > 1
            else None
        )  # the step's metrics are gathered over it

    def _install_router_hook(self, hook) -> None:
        """Every MoE layer routes through `hook` (`parallel_lib.routing.RouterHook`)."""
        moe = [layer for layer in self.layers if getattr(layer.mlp, "moe", None) is not None]
        if not moe:
            raise ValueError("a router hook needs a model with MoE layers: set [model.moe]")
        for layer in moe:
            layer.mlp.hook = hook

    def remove_hooks(self) -> None:
        """Detach the layer hooks from the model (e.g. before building another engine on it)."""
        self._attached.remove()

    def _units(self) -> tuple[list[FlatUnit], list[int | None]]:
        """One flat unit per switchable layer, then one for every other parameter (one per
        dtype and device, as a flat buffer holds one of each); with the layer index of each
        (None for the rest). Parameters that do not require grad when the engine is built are
        left out: they are never trained, reduced or given optimizer state."""
        dp = self.mesh.dp
        in_layers = {id(p) for layer in self.layers for p in layer.parameters()}
        units, owners = [], []
        for i, layer in enumerate(self.layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            if params:
                units.append(FlatUnit(f"layer{i}", params, dp))
                owners.append(i)
        rest: dict[tuple, list[nn.Parameter]] = {}
        for p in self.model.parameters():
            if id(p) not in in_layers and p.requires_grad:
                rest.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), params in rest.items():
            name = "rest" if len(rest) == 1 else f"rest.{dtype}.{device}".replace("torch.", "")
            units.append(FlatUnit(name, params, dp))
            owners.append(None)
        return units, owners

    # ------------------------------------------------------------------ plans
    def strategy_of(self, option: Option) -> Strategy:
        found = self._strategies.get(option)
        if found is None:
            kw = {"inner": option.inner} if option.inner else {}
            found = self._strategies[option] = get_strategy(option.strategy, **kw)
        return found

    def apply(self, plan: Plan) -> None:
        """Set every layer's strategy and recompute mode to the plan's (moves no tensor)."""
        for layer, option in zip(self.layers, plan.options, strict=True):
            layer.set_option(self.strategy_of(option), option.recompute, option.group)

    def pack(self, sequences: Sequence[Sequence[int]], group_size: int | None) -> PackedBatch:
        """This rank's share of a micro-batch: over the whole sp group, or (`group_size` g)
        its sub-group's sequences over the sub-group's g ranks, dealt as the planner priced.
        A sub-group dealt none (fewer sequences than sub-groups) trains one token of id 0 with
        no target (`IDLE_SEQUENCE`), which adds nothing to the loss or the gradients."""
        mesh = self.mesh
        if group_size is None or group_size == mesh.sp:
            return PackedBatch.pack(sequences, mesh.sp, mesh.sp_rank, device=mesh.device)
        split = self._splits.get(group_size)
        if split is None:
            split = self._splits[group_size] = split_group(mesh.sp_group, group_size)
        dealt = self.planner.costs.sub_groups([len(s) for s in sequences], group_size)
        mine = [sequences[i] for i in dealt[split.index]] or [IDLE_SEQUENCE]
        return PackedBatch.pack(mine, group_size, split.position, device=mesh.device, split=split)

    # ------------------------------------------------------------------ training
    def forward_backward(self, sequences: Sequence[Sequence[int]], loss_tokens: int):
        """One micro-batch: plan, pack (on the plan's group size), forward, backward of
        loss / loss_tokens (gradients accumulate). Returns its MicroBatchResult."""
        seq_lens = tuple(len(s) for s in sequences)
        plan = self.planner.plan(seq_lens)
        self.apply(plan)
        batch = self.pack(sequences, plan.group_size)
        loss_sum = self.model(batch)
        auxiliary = getattr(self.model, "auxiliary_loss", lambda: None)()  # MoE balance, z-loss
        total = loss_sum if auxiliary is None else loss_sum + auxiliary
        (total / loss_tokens).backward()
        self.moe_stats.add()
        return MicroBatchResult(seq_lens, plan, float(loss_sum.detach()))

    def step(self, micro_batches: Sequence[Sequence[Sequence[int]]], loss_tokens: int):
        """One optimizer step over this dp group's micro-batches. `loss_tokens`: tokens carrying
        loss in the whole global batch (every dp group), the loss's denominator."""
        if loss_tokens < 1:
            raise ValueError(f"a step needs at least one token with a target, got {loss_tokens}")
        trainable = self._set_trainable()
        self._tell_planner(trainable)
        if self.mesh.world > 1:
            dist.barrier()
        start = time.perf_counter()
        optimizers = [o.optimizer for o in self.optimizers if o.optimizer is not None]
        with PeakMemory(self.mesh.device, self.model, optimizers,
                        enabled=self.measure_memory) as memory:  # fmt: skip
            results = []
            for mb in micro_batches:
                results.append(self.forward_backward(mb, loss_tokens))
                memory.next_micro_batch()
            updates = self.wrapper.updates(self.step_index)
            grad_norm, lr, layer_norms = self._update(trainable, updates)
        step_s = time.perf_counter() - start
        self._place_states(trainable)
        result = self._reduce_metrics(results, loss_tokens, grad_norm, lr, step_s,
                                      memory.peak_bytes, layer_norms)  # fmt: skip
        result.updated = updates
        self.step_index += 1
        self.wrapper.after_step(result)
        return result

    def _set_trainable(self) -> list[bool]:
        """Per unit: does it train this step (the wrapper's choice; the rest always trains)."""
        chosen = self.wrapper.trainable_layers(self.step_index, len(self.layers))
        chosen = None if chosen is None else {int(i) for i in chosen}
        if chosen is not None:
            self._check_agreed(chosen)
        flags = [owner is None or chosen is None or owner in chosen for owner in self.unit_layers]
        for unit, flag in zip(self.units, flags, strict=True):
            unit.set_trainable(flag)
        return flags

    def _check_agreed(self, chosen: set[int]) -> None:
        """Every rank must train the same layers (frozen units skip their collectives)."""
        if self.mesh.world == 1:
            return
        key = sum(1 << i for i in chosen) % ((1 << 61) - 1)
        both = torch.tensor([key, -key], dtype=torch.int64, device=self.mesh.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(
                f"step {self.step_index}: the optimizer wrapper chose different trainable layers "
                "on different ranks; trainable_layers must depend only on the step (and on "
                "values every rank agrees on)"
            )

    def _tell_planner(self, trainable: list[bool]) -> None:
        """The planner prices this step's frozen layers as frozen, and leaves out of the static
        memory the optimizer state the wrapper keeps off the device."""
        trained = {o for o, t in zip(self.unit_layers, trainable, strict=True) if t}
        frozen = [i for i in range(len(self.layers)) if i not in trained]
        # off the device: parked or elsewhere, or a frozen layer that holds none (never stepped)
        units = zip(self.unit_layers, self.optimizers, trainable, strict=True)
        offloaded = [
            owner for owner, opt, t in units
            if owner is not None and (opt.state_off_device() or not (t or opt.state_bytes()[0]))
        ]  # fmt: skip
        self.planner.set_step(frozen=frozen, offloaded=offloaded)

    def _update(
        self, trainable: list[bool], updates: bool = True
    ) -> tuple[float, float, list[float | None]]:
        """Reduce gradients, clip by the global norm, step AdamW (unless not `updates`), zero
        gradients. Returns the global gradient norm, the learning rate (0 without an update) and
        every layer's gradient norm."""
        pairs = zip(self.unit_layers, self.optimizers, trainable, strict=True)
        chosen = [(owner, opt) for owner, opt, t in pairs if t]
        owners, active = [o for o, _ in chosen], [opt for _, opt in chosen]
        if self.mesh.dp == 1 and self.mesh.sp > 1 and active:  # one collective over sp
            squares = reduce_replicated_with_norms(active, self.mesh.sp_group)
        else:
            reduce_replicated(active)
            for opt in active:
                opt.reduce(over_sp=False)
            squares = self._global_squares(active)  # (units, 2), summed over the world
        grad_norm = float(squares.sum().sqrt())
        by_layer: list[float | None] = [None] * len(self.layers)
        for owner, norm in zip(owners, squares.sum(dim=1).sqrt().tolist(), strict=True):
            if owner is not None:
                by_layer[owner] = norm
        if not (updates and math.isfinite(grad_norm)):  # every rank agrees: all skip together
            for unit in self.units:
                unit.zero_grad()
            return grad_norm, 0.0, by_layer
        clip = self.optim_config.grad_clip
        scale = min(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
        lr = learning_rate(self.optim_config, self.step_index, self.total_steps)
        for k, opt in enumerate(active):
            if k + 1 < len(active):
                active[k + 1].prefetch_state()  # overlaps this step on CUDA
            opt.step(lr, scale)
        for unit in self.units:
            unit.zero_grad()
        return grad_norm, lr, by_layer

    def _global_squares(self, active: list[UnitOptimizer]) -> Tensor:
        """Per unit, its squared gradient norm as (sharded part, replicated part), float64, over
        the whole world. Shards differ over sp (and over dp with ZeRO-1); replicated parts agree
        over sp. One all-reduce per group for every unit at once."""
        mesh = self.mesh
        rows = [opt.square_norms() for opt in active]
        sums = torch.tensor(rows, dtype=torch.float64, device=mesh.device).reshape(-1, 2)
        if self.optim_config.shard_optimizer and mesh.dp > 1:
            dist.all_reduce(sums, group=mesh.dp_group.pg)
        if mesh.sp > 1:
            sharded = sums[:, 0].contiguous()
            dist.all_reduce(sharded, group=mesh.sp_group.pg)
            sums[:, 0] = sharded
        return sums

    def _place_states(self, trainable: list[bool]) -> None:
        for owner, opt, flag in zip(self.unit_layers, self.optimizers, trainable, strict=True):
            if owner is None:
                continue
            if self.wrapper.forget_state(owner, flag):
                opt.forget_state()
            device = self.wrapper.state_device(owner, flag)
            if device is None:
                continue
            if torch.device(device).type == "cpu":
                opt.park_state()  # host memory (pinned on CUDA); on a CPU run too, by the same path
            else:
                opt.state_to(torch.device(device))

    def _reduce_metrics(self, results, loss_tokens, grad_norm, lr, step_s, peak,
                        layer_norms) -> StepResult:  # fmt: skip
        mesh = self.mesh
        loss_sum = sum(r.loss_sum for r in results)
        predicted_s = sum(r.plan.predicted_s for r in results)
        predicted_peak = max((r.plan.predicted_peak_bytes for r in results), default=0)
        kw = {"dtype": torch.float64, "device": mesh.device}  # nccl reduces device tensors only
        held = sum(opt.state_bytes()[0] for opt in self.optimizers)
        row = torch.tensor([[loss_sum, step_s, predicted_s, peak, predicted_peak, held]], **kw)
        if self._world is not None:  # one gather: the loss summed in rank order, the rest's max
            row = all_gather_dim0(row, self._world)
        total, worst = row[:, 0].sum(0, keepdim=True), row[:, 1:].amax(0)
        moe = self.moe_stats.reduce(mesh.device, mesh.world, loss_tokens)
        return StepResult(
            step=self.step_index,
            loss=float(total[0]) / loss_tokens,
            loss_tokens=loss_tokens,
            grad_norm=grad_norm,
            lr=lr,
            skipped=not math.isfinite(grad_norm),
            layer_grad_norms=layer_norms,
            step_s=float(worst[0]),
            predicted_s=float(worst[1]),
            peak_bytes=int(worst[2]),
            predicted_peak_bytes=int(worst[3]),
            optimizer_state_bytes=int(worst[4]),
            micro_batches=results,
            moe=moe,
        )
