"""The stateful parts of a training run, as a checkpoint sees them: each one `state_dict()` (tensors
and JSON values) and `load_state_dict()` (torch's `Stateful`), handed to the `Checkpointer` by
name. A new part (an integration's) is one more object with these two methods.

Weights are saved as the logical whole tensors they are shards of (a DTensor sharded over sp and
replicated over dp), so a later run with another P reads exactly its own rows; fused shards are
cut into their logical parts first (Q, K, V rows of the attention shard, the MLP's gate and up
rows). AdamW moments follow their parameters the same way (gathered over dp first under ZeRO-1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel_lib import Mesh

from .optim import UnitOptimizer
from .sharding import is_sharded

__all__ = ["ModelState", "OptimizerState", "TrainProgress", "logical_parts", "device_mesh_of"]

MOMENTS = ("exp_avg", "exp_avg_sq")
HOST = "host"
"""A unit's optimizer state parked in host memory (`paradyse.offload`)."""


def logical_parts(model: nn.Module, P: int) -> dict[int, list[tuple[str, int, int, int | None]]]:
    """For every parameter (by id): [(key, row start, row stop, global rows)] of the logical
    whole tensors it holds rows of; global rows None for replicated parameters. Modules with
    fused shards describe them (`logical_parts(prefix)`, e.g. the switchable layer's Q/K/V rows);
    any other sharded parameter is one Shard(0) piece of P x its rows."""
    out: dict[int, list] = {}
    described: list[str] = []  # modules that described their parameters, and so their children's
    for name, module in model.named_modules():
        describe = getattr(module, "logical_parts", None)
        if not callable(describe) or any(d == "" or name.startswith(f"{d}.") for d in described):
            continue
        described.append(name)
        for param_name, parts in describe(f"{name}." if name else "").items():
            out[id(module.get_parameter(param_name))] = parts
    for name, p in model.named_parameters():
        if id(p) not in out:
            rows = p.shape[0] * P if is_sharded(p) and p.dim() > 0 else None
            out[id(p)] = [(name, 0, p.shape[0] if p.dim() else 0, rows)]
    return out


def device_mesh_of(mesh: Mesh):
    """The (dp, sp) DeviceMesh the whole tensors are laid out on; None for one process."""
    if mesh.world == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    grid = torch.arange(mesh.world).reshape(mesh.dp, mesh.sp)
    return DeviceMesh(mesh.device.type, grid, mesh_dim_names=("dp", "sp"))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


class _WholeTensors:
    """Views of this rank's rows of logical whole tensors, saved as DTensors (Shard(0) over sp,
    Replicate over dp) or, in one process, as the tensors themselves."""

    def __init__(self, model: nn.Module, mesh: Mesh, device_mesh) -> None:
        self.model, self.P, self.device_mesh = model, mesh.sp, device_mesh
        self.parts = logical_parts(model, mesh.sp)

    def wrap(self, local: Tensor, rows: int | None):
        if self.device_mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Replicate, Shard

        placements = [Replicate(), Replicate() if rows is None else Shard(0)]
        shape = local.shape if rows is None else torch.Size([rows, *local.shape[1:]])
        return DTensor.from_local(local, self.device_mesh, placements, run_check=False,
                                  shape=shape, stride=_contiguous_stride(shape))  # fmt: skip

    def views(self, tensor_of) -> dict[str, Tensor]:
        """{key: this rank's rows} for every parameter; tensor_of(param) is the tensor saved in
        its place (the parameter, or a moment shaped like it)."""
        views = {}
        for p in self.model.parameters():
            t = tensor_of(p)
            if t is None:
                continue
            for key, start, stop, _ in self.parts[id(p)]:
                views[key] = t[start:stop] if t.dim() else t
        return views

    def rows(self) -> dict[str, int | None]:
        return {key: rows for parts in self.parts.values() for key, _, _, rows in parts}

    @staticmethod
    @torch.no_grad()
    def copy_into(targets: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Copy loaded values into their targets (nothing to do where DCP loaded in place)."""
        for key, target in targets.items():
            value = state[key]
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.data_ptr() != target.data_ptr():
                target.copy_(local)


class ModelState(_WholeTensors):
    """Every parameter, as logical whole tensors."""

    def _targets(self) -> dict[str, Tensor]:
        return self.views(lambda p: p.detach())

    def state_dict(self) -> dict[str, Any]:
        rows = self.rows()
        return {key: self.wrap(view, rows[key]) for key, view in self._targets().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.copy_into(self._targets(), state)


class OptimizerState(_WholeTensors):
    """AdamW's moments, laid out like their parameters; every unit's step count (units frozen in
    some steps have taken fewer) and where its moments were kept (an optimizer wrapper's
    offload), so a resumed run holds them where the uninterrupted one did."""

    def __init__(self, model: nn.Module, mesh: Mesh, device_mesh, optimizers) -> None:
        super().__init__(model, mesh, device_mesh)
        self.mesh = mesh
        self.optimizers: list[UnitOptimizer] = list(optimizers)

    def _flats(self) -> tuple[list[tuple[UnitOptimizer, str, Tensor]], dict[str, Tensor]]:
        """Every unit's moments as whole flat buffers (gathered over dp under ZeRO-1; zeros
        where the optimizer has not stepped yet) and their views per logical key."""
        flats, by_param = [], {}
        for opt in self.optimizers:
            unit = opt.unit
            for which in MOMENTS:
                flat = torch.zeros(unit.data.numel(), dtype=torch.float32, device=unit.data.device)
                if opt.optimizer is not None:
                    for index, piece in enumerate(opt.pieces):
                        moment = opt.moments(index)  # none yet: the zeros stand
                        if moment:
                            flat[piece.start : piece.stop] = moment[which]
                if opt.sharded:
                    dist.all_reduce(flat, group=opt.dp_group.pg)  # slices are disjoint
                flats.append((opt, which, flat))
                offset = 0
                for p in unit.params:
                    by_param[(id(p), which)] = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
        views = {}
        for which in MOMENTS:
            found = self.views(lambda p, w=which: by_param.get((id(p), w)))
            views.update({f"{which}/{key}": view for key, view in found.items()})
        return flats, views

    def state_dict(self) -> dict[str, Any]:
        rows = self.rows()
        _, views = self._flats()
        state = {k: self.wrap(v, rows[k.split("/", 1)[1]]) for k, v in views.items()}
        steps = [float(self._adam_step(opt)) for opt in self.optimizers]
        state["step"] = torch.tensor(steps, dtype=torch.float64, device=self.mesh.device)
        if self.mesh.dp > 1:  # a ZeRO-1 slice of padding only has no optimizer: take the most
            dist.all_reduce(state["step"], op=dist.ReduceOp.MAX, group=self.mesh.dp_group.pg)
        state["offloaded"] = [_offload_device(opt) for opt in self.optimizers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt in self.optimizers:  # parked state comes back, to be overwritten like the rest
            if opt.optimizer is not None:
                opt.host.restore(opt.optimizer, opt.optim_params)
        flats, views = self._flats()
        self.copy_into(views, state)
        steps = {id(opt): int(n) for opt, n in zip(self.optimizers, state["step"], strict=True)}
        for opt, which, flat in flats:
            if opt.optimizer is None:
                continue
            if steps[id(opt)] == 0:  # never stepped: its state stays to be made by its first
                opt.optimizer.state.clear()
                continue
            _ensure_state(opt)
            for param, piece in zip(opt.optim_params, opt.pieces, strict=True):
                moment = opt.optimizer.state[param]
                moment[which].copy_(flat[piece.start : piece.stop])
                moment["step"].fill_(steps[id(opt)])
        for opt, device in zip(self.optimizers, state["offloaded"], strict=True):
            if device == HOST:
                opt.park_state()
            elif device:
                opt.state_to(torch.device(device))

    @staticmethod
    def _adam_step(opt: UnitOptimizer) -> int:
        """The unit's AdamW step count (0 before its first step; every slice steps together)."""
        if opt.optimizer is not None:
            for index in range(len(opt.optim_params)):
                state = opt.moments(index)
                if state:
                    return int(state["step"])
        return 0


def _offload_device(opt: UnitOptimizer) -> str:
    """Where the unit's moments are kept when that is not with its weights, else '': 'host'
    when parked (`UnitOptimizer.park_state`)."""
    if not opt.state_off_device():
        return ""
    if opt.host:
        return HOST
    moment = next(v for s in opt.optimizer.state.values() for v in s.values() if v.dim() > 0)
    return str(moment.device)


def _ensure_state(opt: UnitOptimizer) -> None:
    """AdamW state (zeros, step 0) for an optimizer that has not stepped, so a load can fill it."""
    for param in opt.optim_params:
        state = opt.optimizer.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


class TrainProgress:
    """The engine's step count and torch's RNG state."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.engine.step_index, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.step_index = int(state["step"])
        torch.set_rng_state(state["rng"])
