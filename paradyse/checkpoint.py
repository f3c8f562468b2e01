"""Checkpoints with torch.distributed.checkpoint: model, optimizer, data position and RNG,
resumable on a different world size or sp.

Every weight is saved as the logical whole tensor it is a shard of (a DTensor sharded over sp and
replicated over dp), so a later run with another P reads exactly its own rows. The switchable
layer's fused shards are cut into their logical parts first (Q, K, V rows of `attn_qkv`; gate
and up rows of `mlp_gate_up`). AdamW moments follow their parameters the same way (gathered
over dp first under ZeRO-1). A checkpoint is written into `DIR/.step-N.partial`, described by
`paradyse.json` (step, mesh, model shape, every file's size and sha256) and renamed to
`DIR/step-N` only when complete; `DIR/latest` is replaced atomically last. A crash mid-save leaves
the previous checkpoint and `latest` valid. Loading checks the manifest and reads DCP's metadata
with an unpickler that accepts only DCP's own metadata classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from .layer import SwitchableDecoderLayer
from .mesh import rank0_value
from .model import is_sharded

__all__ = ["CheckpointError", "Checkpointer", "checked_checkpoint", "find_checkpoint", "MANIFEST"]

MANIFEST = "paradyse.json"
FORMAT = "paradyse-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line saying why and what to do."""


# ---------------------------------------------------------------- safe metadata


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's metadata consists of: its dataclasses, torch sizes and dtypes, builtins."""

    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                 "bool", "slice", "NoneType"}  # fmt: skip
    _OTHERS = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # fmt: skip

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or (
            module == "builtins" and name in self._BUILTINS
        ):
            return super().find_class(module, name)
        if (module, name) in self._OTHERS:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            kinds = torch.dtype | torch.layout | torch.memory_format
            if name == "Size" or isinstance(value, kinds):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by `_MetadataUnpickler` instead of pickle."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------- state pieces


def _layer_parts(name: str, layer: SwitchableDecoderLayer) -> dict[int, list]:
    """A switchable layer's fused shards cut into logical whole tensors:
    {id(param): [(key, row start, row stop, global rows)]}."""
    shape, P = layer.shape, layer.group.size
    d = shape.head_dim
    hq, hk, f = shape.heads // P * d, shape.kv_heads // P * d, shape.ffn_hidden // P
    q_rows, kv_rows, f_rows = shape.heads * d, shape.kv_heads * d, shape.ffn_hidden
    return {
        id(layer.attn_qkv): [(f"{name}.wq", 0, hq, q_rows), (f"{name}.wk", hq, hq + hk, kv_rows),
                             (f"{name}.wv", hq + hk, hq + 2 * hk, kv_rows)],
        id(layer.attn_out): [(f"{name}.wo_t", 0, hq, q_rows)],
        id(layer.mlp_gate_up): [(f"{name}.w_gate", 0, f, f_rows),
                                (f"{name}.w_up", f, 2 * f, f_rows)],
        id(layer.mlp_down): [(f"{name}.w_down_t", 0, f, f_rows)],
    }  # fmt: skip


def logical_parts(model: torch.nn.Module, P: int) -> dict[int, list[tuple[str, int, int, int]]]:
    """For every parameter (by id): [(key, row start, row stop, global rows)] of the logical
    whole tensors it holds rows of; global rows None for replicated parameters. A sharded
    parameter outside a switchable layer is one Shard(0) piece of P x its rows."""
    out: dict[int, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, SwitchableDecoderLayer):
            out.update(_layer_parts(name, module))
    for name, p in model.named_parameters():
        if id(p) not in out:
            rows = p.shape[0] * P if is_sharded(p) and p.dim() > 0 else None
            out[id(p)] = [(name, 0, p.shape[0] if p.dim() else 0, rows)]
    return out


class Checkpointer:
    """Saves and loads a Trainer's state (collective: every rank calls every method)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        mesh = trainer.mesh
        self.device_mesh = None
        if mesh.world > 1:
            from torch.distributed.device_mesh import DeviceMesh

            grid = torch.arange(mesh.world).reshape(mesh.dp, mesh.sp)
            self.device_mesh = DeviceMesh(mesh.device.type, grid, mesh_dim_names=("dp", "sp"))

    # ------------------------------------------------------------ building the state dict
    def _wrap(self, local: Tensor, rows: int | None):
        """A DTensor of the whole tensor (Shard(0) over sp, Replicate over dp), or the tensor."""
        if self.device_mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if rows is None:
            placements = [Replicate(), Replicate()]
            shape = local.shape
        else:
            placements = [Replicate(), Shard(0)]
            shape = torch.Size([rows, *local.shape[1:]])
        return DTensor.from_local(local, self.device_mesh, placements, run_check=False,
                                  shape=shape, stride=_contiguous_stride(shape))  # fmt: skip

    def _param_entries(self, tensor_of) -> dict[str, object]:
        """{key: (D)Tensor} for every parameter; tensor_of(param) gives the tensor to save in
        its place (the parameter, or its moment)."""
        model, P = self.trainer.model, self.trainer.mesh.sp
        parts = logical_parts(model, P)
        entries = {}
        for p in model.parameters():
            t = tensor_of(p)
            if t is None:
                continue
            for key, start, stop, rows in parts[id(p)]:
                local = t[start:stop] if t.dim() else t
                entries[key] = self._wrap(local, rows)
        return entries

    def state_dict(self) -> dict[str, object]:
        """Everything a resume needs, as tensors (no pickled objects)."""
        trainer = self.trainer
        state = {f"model/{k}": v for k, v in self._param_entries(lambda p: p.detach()).items()}
        moments = self._moments()
        for which in ("exp_avg", "exp_avg_sq"):
            found = self._param_entries(lambda p, w=which: moments.get((id(p), w)))
            state.update({f"optim/{which}/{k}": v for k, v in found.items()})
        state["optim/step"] = torch.tensor([float(self._adam_step())], dtype=torch.float64)
        extra = {"step": trainer.engine.step_index, "data": trainer.batches.state_dict()}
        state["trainer/json"] = _json_tensor(extra)
        state["trainer/rng"] = torch.get_rng_state()
        return state

    # ------------------------------------------------------------ optimizer moments
    def _moments(self) -> dict[tuple[int, str], Tensor]:
        """(param id, 'exp_avg'|'exp_avg_sq') -> a tensor shaped like the parameter: a view of
        the live AdamW state, or under ZeRO-1 of a dp-gathered copy (created as zeros where
        the optimizer has not stepped yet)."""
        out: dict[tuple[int, str], Tensor] = {}
        self._gathered = []
        for opt in self.trainer.engine.optimizers:
            unit = opt.unit
            for which in ("exp_avg", "exp_avg_sq"):
                flat = torch.zeros(unit.data.numel(), dtype=torch.float32, device=unit.data.device)
                if opt.optimizer is not None:
                    _ensure_state(opt)
                    for param, piece in zip(opt.optim_params, opt.pieces, strict=True):
                        flat[piece.start : piece.stop] = opt.optimizer.state[param][which]
                if opt.sharded:
                    dist.all_reduce(flat, group=opt.dp_group.pg)  # slices are disjoint
                self._gathered.append((opt, which, flat))
                offset = 0
                for p in unit.params:
                    out[(id(p), which)] = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
        return out

    def _adam_step(self) -> int:
        for opt in self.trainer.engine.optimizers:
            if opt.optimizer is not None:
                for state in opt.optimizer.state.values():
                    return int(state["step"])
        return 0

    def _restore_moments(self, step: int) -> None:
        for opt, which, flat in self._gathered:
            if opt.optimizer is None:
                continue
            for param, piece in zip(opt.optim_params, opt.pieces, strict=True):
                state = opt.optimizer.state[param]
                state[which].copy_(flat[piece.start : piece.stop])
                state["step"].fill_(step)

    # ------------------------------------------------------------ save and load
    def save(self, root: str | Path) -> Path:
        """Write `root/step-N` atomically and point `root/latest` at it."""
        trainer, mesh = self.trainer, self.trainer.mesh
        root = Path(root)
        step = trainer.engine.step_index
        final = root / f"step-{step:08d}"
        partial = root / f".step-{step:08d}.partial"
        if mesh.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier(mesh)
        dcp.save(self.state_dict(), checkpoint_id=str(partial), no_dist=not dist.is_initialized())
        _barrier(mesh)
        if mesh.rank == 0:
            manifest = {
                "format": FORMAT,
                "step": step,
                "world": mesh.world,
                "sp": mesh.sp,
                "dp": mesh.dp,
                "model": asdict(trainer.config.model),
                "files": {f.name: _describe(f) for f in sorted(partial.iterdir())},
            }
            _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _write_atomic(root / "latest", final.name + "\n")
        _barrier(mesh)
        return final

    def load(self, directory: Path) -> int:
        """Restore the state saved in `directory` (from `checked_checkpoint`); returns the step
        to continue from. CheckpointError, one line, if DCP cannot read it."""
        trainer = self.trainer
        state = self.state_dict()
        try:
            dcp.load(state, storage_reader=SafeReader(str(directory)),
                     no_dist=not dist.is_initialized())  # fmt: skip
        except (Exception, CheckpointException) as error:  # DCP's own is a BaseException
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"checkpoint {directory} could not be read ({type(error).__name__}: "
                f"{first[:300]}); "
                "resume from an earlier one"
            ) from None
        step = int(state["optim/step"][0])
        self._restore_moments(step)
        extra = json.loads(bytes(state["trainer/json"].tolist()).rstrip(b"\0"))
        trainer.batches.load_state_dict(extra["data"])
        trainer.engine.step_index = int(extra["step"])
        torch.set_rng_state(state["trainer/rng"])
        return int(extra["step"])


def checked_checkpoint(path: str | Path, model: dict, mesh) -> Path:
    """The checkpoint `path` names (itself, or its `latest`), its files and model shape checked
    by rank 0 and the verdict shared: cheap, so a run checks it before any slow set-up.
    CheckpointError, one line, on every rank if it is unusable."""
    verdict = None
    if mesh.rank == 0:
        try:
            directory = find_checkpoint(path)
            verify(directory, model)
            verdict = {"path": str(directory)}
        except CheckpointError as error:
            verdict = {"error": str(error)}
    verdict = rank0_value(verdict, mesh.device)
    if "error" in verdict:
        raise CheckpointError(verdict["error"])
    return Path(verdict["path"])


# ---------------------------------------------------------------- files


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself when it holds a manifest, else the checkpoint its `latest` names."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        raise CheckpointError(f"{latest} names {target.name}, which is not a complete checkpoint")
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such directory")
    raise CheckpointError(f"--resume {path}: not a ParaDySe checkpoint (no {MANIFEST} or latest)")


def verify(directory: Path, model: dict) -> dict:
    """The manifest of `directory`, after checking every file's size and sha256 and the model."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / MANIFEST} is unreadable ({error})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory} has format {manifest.get('format')!r}, not {FORMAT}")
    for name, (size, digest) in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        if _describe(file) != [size, digest]:
            raise CheckpointError(
                f"checkpoint {directory} is corrupt: {name} differs from when it was written "
                "(truncated or changed); resume from an earlier checkpoint"
            )
    if manifest["model"] != model:
        changed = sorted(k for k in model if manifest["model"].get(k) != model[k])
        raise CheckpointError(
            f"checkpoint {directory} is of another model shape (model.{', model.'.join(changed)} "
            "differ): resume with the config it was written with"
        )
    return manifest


def _describe(file: Path) -> list:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return [file.stat().st_size, digest.hexdigest()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_tensor(value, size: int = 4096) -> Tensor:
    """JSON bytes as a fixed-size uint8 tensor (padded with zeros), so no object is pickled."""
    data = json.dumps(value).encode()
    if len(data) > size:
        raise ValueError(f"trainer state of {len(data)} bytes exceeds {size}")
    out = torch.zeros(size, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _ensure_state(opt) -> None:
    """AdamW state (zeros, step 0) for an optimizer that has not stepped, so a load can fill it."""
    for param in opt.optim_params:
        state = opt.optimizer.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _barrier(mesh) -> None:
    if mesh.world > 1:
        dist.barrier()
