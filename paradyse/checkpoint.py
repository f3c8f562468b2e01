"""Checkpoints with torch.distributed.checkpoint, resumable on a different world size or sp.

The `Checkpointer` saves the stateful parts it is handed by name (the model, the optimizer, the
data position, the training progress, each integration's state; see `paradyse.checkpoint_state`)
and never reaches into the trainer. Each part's `state_dict()` gives tensors (saved as they are,
DTensors included) and JSON values (kept in one fixed-size byte tensor per part, so nothing is
pickled); `load_state_dict()` gets them back after a load. A checkpoint is written into
`DIR/.step-N.partial`, described by `paradyse.json` (step, mesh, model shape, integrations,
every file's size and sha256) and renamed to `DIR/step-N` only when complete; `DIR/latest` is
replaced atomically last. A crash mid-save leaves the previous checkpoint and `latest` valid.
Loading checks the manifest and reads DCP's metadata with an unpickler that accepts only DCP's
own metadata classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from parallel_lib.mesh import rank0_value

from .integration import Stateful

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "checked_checkpoint",
    "find_checkpoint",
    "first_start",
    "saved_model",
    "MANIFEST",
]

MANIFEST = "paradyse.json"
FORMAT = "paradyse-checkpoint-2"
PROVENANCE = ("init",)
"""Model keys that say where the first weights came from, not what the model is: a resume
does not compare them (the weights come from the checkpoint)."""


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


# ---------------------------------------------------------------- the checkpointer

JSON_BYTES = 1 << 16
"""Room for one part's JSON values (a fixed size: a load fills the tensor it saved)."""


class Checkpointer:
    """Saves and loads named stateful parts (collective: every rank calls every method).

    `describe` goes into the manifest as it is (the model shape, the integrations), so that
    `checked_checkpoint` can refuse a checkpoint of another run before any slow set-up."""

    def __init__(self, mesh, parts: Mapping[str, Stateful], describe: dict[str, Any]) -> None:
        self.mesh, self.parts, self.describe = mesh, dict(parts), dict(describe)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state, flattened to `part/key` tensors for DCP."""
        state: dict[str, Any] = {}
        for name, part in self.parts.items():
            plain = {}
            for key, value in part.state_dict().items():
                if isinstance(value, Tensor):
                    state[f"{name}/{key}"] = value
                else:
                    plain[key] = value
            if plain:
                state[f"{name}/json"] = _json_tensor(plain, name)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            prefix = f"{name}/"
            values = {
                k.removeprefix(prefix): v
                for k, v in state.items()
                if k.startswith(prefix) and k != f"{name}/json"
            }
            if f"{name}/json" in state:
                values.update(json.loads(bytes(state[f"{name}/json"].tolist()).rstrip(b"\0")))
            try:
                part.load_state_dict(values)
            except (KeyError, ValueError, TypeError) as error:  # DataError is a ValueError
                raise CheckpointError(
                    f"the checkpoint's {name} state cannot be restored ({type(error).__name__}: "
                    f"{error}); resume with the config it was written with"
                ) from None

    def save(self, root: str | Path, step: int) -> Path:
        """Write `root/step-N` atomically and point `root/latest` at it."""
        mesh, root = self.mesh, Path(root)
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
                "parts": sorted(self.parts),
                **self.describe,
                "files": {f.name: _describe(f) for f in sorted(partial.iterdir())},
            }
            _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _write_atomic(root / "latest", final.name + "\n")
        _barrier(mesh)
        return final

    def load(self, directory: Path) -> None:
        """Restore every part from `directory` (from `checked_checkpoint`). CheckpointError, one
        line, if DCP cannot read it."""
        state = self.state_dict()
        try:
            dcp.load(state, storage_reader=SafeReader(str(directory)),
                     no_dist=not dist.is_initialized())  # fmt: skip
        except (Exception, CheckpointException) as error:  # DCP's own is a BaseException
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"checkpoint {directory} could not be read ({type(error).__name__}: "
                f"{first[:300]}); resume from an earlier one"
            ) from None
        self._restore(state)


def checked_checkpoint(path: str | Path, describe: dict[str, Any], mesh) -> Path:
    """The checkpoint `path` names (itself, or its `latest`), its files checked and its
    description (model shape, integrations) compared with this run's by rank 0, and the verdict
    shared: cheap, so a run checks it before any slow set-up. CheckpointError, one line, on every
    rank if it is unusable."""
    verdict = None
    if mesh.rank == 0:
        try:
            directory = find_checkpoint(path)
            verify(directory, describe)
            verdict = {"path": str(directory)}
        except CheckpointError as error:
            verdict = {"error": str(error)}
    verdict = rank0_value(verdict, mesh.device)
    if "error" in verdict:
        raise CheckpointError(verdict["error"])
    return Path(verdict["path"])


# ---------------------------------------------------------------- files


def first_start(train, mesh) -> bool:
    """`train.resume` equal to `train.save` with nothing saved there yet (rank 0 looks): the
    first start of a job that resumes itself after failures (torchrun --max-restarts)."""
    if not train.save or Path(train.resume) != Path(train.save):
        return False
    empty = None
    if mesh.rank == 0:
        root = Path(train.resume)
        empty = not (root / "latest").is_file() and not (root / MANIFEST).is_file()
    return bool(rank0_value(empty, mesh.device))


def saved_model(path: str | Path, mesh):
    """The `ModelConfig` of the checkpoint `path` names (rank 0 reads its manifest), or None
    if it cannot be read (the resume's own checks then say why)."""
    from .model import ModelConfig

    saved = None
    if mesh.rank == 0:
        try:
            directory = find_checkpoint(path)
            saved = json.loads((directory / MANIFEST).read_text())["model"]
        except (CheckpointError, OSError, ValueError, KeyError, TypeError):
            saved = None
    saved = rank0_value(saved, mesh.device)
    try:
        return None if saved is None else ModelConfig(**saved)
    except (TypeError, ValueError):
        return None


def find_checkpoint(path: str | Path, flag: str = "--resume") -> Path:
    """`path` itself when it holds a manifest, else the checkpoint its `latest` names; errors
    name the path as the `flag` that gave it."""
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
        raise CheckpointError(f"{flag} {path}: no such directory")
    raise CheckpointError(f"{flag} {path}: not a ParaDySe checkpoint (no {MANIFEST} or latest)")


def verify(directory: Path, describe: dict[str, Any]) -> dict:
    """The manifest of `directory`, after checking every file's size and sha256, and that it
    describes this run (`describe`: the model shape, the integrations)."""
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
    model = json.loads(json.dumps(describe["model"]))  # as the manifest holds it (lists)
    changed = sorted(
        k for k in model if k not in PROVENANCE and manifest["model"].get(k) != model[k]
    )
    if changed:
        raise CheckpointError(
            f"checkpoint {directory} is of another model shape (model.{', model.'.join(changed)} "
            "differ): resume with the config it was written with"
        )
    saved, wanted = manifest.get("integrations", {}), describe.get("integrations", {})
    if saved != wanted:
        raise CheckpointError(
            f"checkpoint {directory} was written with [integrations] {saved or 'none'}, this run "
            f"has {wanted or 'none'}: resume with the integrations and options it was written with"
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


def _json_tensor(value, part: str, size: int = JSON_BYTES) -> Tensor:
    """JSON bytes as a fixed-size uint8 tensor (padded with zeros), so no object is pickled."""
    data = json.dumps(value).encode()
    if len(data) > size:
        raise ValueError(f"the {part} state has {len(data)} bytes of JSON values; at most {size}")
    out = torch.zeros(size, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _barrier(mesh) -> None:
    if mesh.world > 1:
        dist.barrier()
