"""Writing a consolidated Hugging Face Llama folder (config.json + safetensors, sharded with an
index past `--shard-size`, and the tokenizer) from a live model or a ParaDySe checkpoint.

    python -m integrations.hf.export CHECKPOINT OUT     # a checkpoint (or a run folder's latest)
    python -m integrations.hf.export hf:PATH OUT        # re-export a folder or a GGUF file

The folder is written beside OUT and renamed into place when complete, so a failed export
never leaves a half-written model where a good one was. Tensors are written in the model's
float32 (or `--dtype bfloat16`), contiguous and in a fixed order, so exporting a re-imported
export gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from paradyse.model import DecoderModel, ModelConfig
from parallel_lib import all_gather_tokens

from .config import hf_config_from_model
from .files import SAFETENSORS_INDEX, HFError, read_config
from .load import EMBEDDING, HEAD, LAYER_NAMES, NORM, hf_name, source_of

__all__ = ["export_model", "export_checkpoint", "hf_tensors", "write_folder", "check_out", "main"]

TRANSPOSED = {"wo": "wo_t", "w_down": "w_down_t"}
"""Whole weights a checkpoint stores transposed (their shards are columns of the HF weight)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_tensors(whole: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """HF names -> tensors, from the logical whole tensors of a model or checkpoint
    (`paradyse.checkpoint_state`: layers.I.wq, layers.I.wo_t, ..., embedding.weight)."""
    out = {EMBEDDING: whole["embedding.weight"]}
    for i in range(config.layers):
        for key in LAYER_NAMES:
            if key in ("attn_norm", "mlp_norm"):
                tensor = whole[f"layers.{i}.{key}.weight"]
            elif key in TRANSPOSED:
                tensor = whole[f"layers.{i}.{TRANSPOSED[key]}"].t()
            else:
                tensor = whole[f"layers.{i}.{key}"]
            out[hf_name(i, key)] = tensor
    out[NORM] = whole["norm.weight"]
    if not config.tie_embeddings:
        out[HEAD] = whole["head.weight"]
    return out


def _shards(tensors: dict[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors of at most `limit` bytes each (a bigger tensor alone)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_folder(
    out: str | os.PathLike,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    *,
    tokenizer=None,
    shard_bytes: int = 5 << 30,
) -> Path:
    """config.json, model.safetensors (or model-0000i-of-0000n.safetensors and the index) and
    the tokenizer's files in `out`, written to `out.partial` and renamed when complete."""
    from safetensors.torch import save_file

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    shards = _shards(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(partial / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(partial / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    dtype = next(iter(tensors.values())).dtype
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial))
    check_out(out)
    if out.exists():  # swap: the old model stays whole until the new one is in place
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    return out


def check_out(out: str | os.PathLike) -> None:
    """OUT must be new, or a model folder to replace (config.json, no checkpoint in it): an
    export never deletes anything else."""
    out = Path(out)
    if not out.exists():
        return
    from paradyse.checkpoint import MANIFEST

    model_folder = out.is_dir() and (out / "config.json").is_file()
    holds_runs = any((out / name).exists() for name in (MANIFEST, "latest"))
    if not model_folder or holds_runs:
        raise HFError(f"{out} exists and is not a model folder an export may replace: choose a "
                      "new output folder or remove it")  # fmt: skip


@torch.no_grad()
def _whole_tensors(model: DecoderModel) -> dict[str, Tensor]:
    """The model's logical whole tensors, gathered over its sp group (collective)."""
    from paradyse.checkpoint_state import ModelState

    state = ModelState(model, _OneGroup(model.group.size), None)
    rows = state.rows()
    return {
        key: view if rows[key] is None else all_gather_tokens(view.contiguous(), model.group)
        for key, view in state.views(lambda p: p.detach()).items()
    }


class _OneGroup:
    """The one field of a mesh that `ModelState` reads to describe a model's shards."""

    def __init__(self, sp: int) -> None:
        self.sp = sp


def _base_config(init: str) -> dict[str, Any] | None:
    """The source's config.json, kept for the fields the shape does not set (token ids...)."""
    if not init:
        return None
    try:
        return read_config(source_of(init))
    except HFError as error:  # the source moved since training: the shape still describes it
        print(f"warning: {error}; config.json gets the model's shape only (no token ids)",
              file=sys.stderr)  # fmt: skip
        return None


def _tokenizer(path: str | None):
    if not path:
        return None
    from .tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(path)


def export_model(
    model: DecoderModel,
    out: str | os.PathLike,
    *,
    rank: int = 0,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    shard_bytes: int = 5 << 30,
) -> Path | None:
    """Write `model` as an HF folder (collective over the model's sp group; the process of
    global `rank` 0 writes). `tokenizer`: a tokenizer folder or GGUF file to include
    (default: the model's `init` source, where it has one)."""
    whole = _whole_tensors(model)
    if rank != 0:
        return None
    return _write(out, whole, model.config, dtype, tokenizer, shard_bytes)


def _write(out, whole, config: ModelConfig, dtype, tokenizer, shard_bytes: int) -> Path:
    """An HF folder of the logical whole tensors of a model of `config`."""
    tensors = hf_tensors(whole, config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    hf_config = hf_config_from_model(config, _base_config(config.init))
    tokenizer = tokenizer or _tokenizer_of(config.init)
    if tokenizer is None and config.init:
        print(f"warning: no tokenizer is written ({config.init} has none or is gone): pass "
              "--tokenizer PATH", file=sys.stderr)  # fmt: skip
    tokenizer = _tokenizer(tokenizer)
    return write_folder(out, tensors, hf_config, tokenizer=tokenizer, shard_bytes=shard_bytes)


def _tokenizer_of(init: str) -> str | None:
    """The init source when it carries a tokenizer (tokenizer.json, or a GGUF file)."""
    if not init:
        return None
    path = Path(init[3:])
    if (
        path.suffix == ".gguf"
        or (path / "tokenizer.json").is_file()
        or (path / "tokenizer.model").is_file()
    ):
        return str(path)
    return None


def read_checkpoint_model(checkpoint: str | os.PathLike) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The model config and logical whole tensors of a ParaDySe checkpoint, in one process
    (files checked against the manifest first). HFError, one line, if it cannot be read."""
    import torch.distributed.checkpoint as dcp

    from paradyse.checkpoint import MANIFEST, CheckpointError, SafeReader, find_checkpoint, verify

    if (Path(checkpoint) / "config.json").is_file():
        raise HFError(f"{checkpoint} is a Hugging Face folder, not a ParaDySe checkpoint: write "
                      f"hf:{checkpoint} to re-export it")  # fmt: skip
    try:
        directory = find_checkpoint(checkpoint, flag="checkpoint")
        manifest = json.loads((directory / MANIFEST).read_text())
        verify(directory, {"model": manifest["model"],
                           "integrations": manifest.get("integrations", {})})  # fmt: skip
        config = ModelConfig(**manifest["model"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError) as error:
        raise HFError(str(error)) from None
    reader = SafeReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model/") and hasattr(meta, "size")
    }
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process, as asked
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as error:  # DCP wraps what failed in its own exceptions
        raise HFError(
            f"checkpoint {directory} could not be read ({type(error).__name__})"
        ) from None
    return config, {key.removeprefix("model/"): value for key, value in state.items()}


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    shard_bytes: int = 5 << 30,
) -> Path:
    """Write the model of a ParaDySe checkpoint as an HF folder (one process)."""
    config, whole = read_checkpoint_model(checkpoint)
    return _write(out, whole, config, dtype, tokenizer, shard_bytes)


def _export_pretrained(init: str, out, **kwargs) -> Path:
    """Re-export an HF folder or GGUF file through the model (one process, sp = 1)."""
    from parallel_lib import CommGroup

    from .load import load_pretrained, pretrained_model_config

    config, source = pretrained_model_config(init)
    model = DecoderModel(config, CommGroup.single(), random_init=False)
    load_pretrained(model, source)
    return export_model(model, out, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m integrations.hf.export",
        description="Write a ParaDySe checkpoint (or an HF folder / GGUF file given as hf:PATH) "
        "as a consolidated Hugging Face Llama folder that transformers loads.",
    )
    parser.add_argument(
        "checkpoint", help="checkpoint folder, a run folder with `latest`, or hf:PATH"
    )
    parser.add_argument("out", help="output folder (replaced when the export is complete)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the written tensors (default float32)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or GGUF file to include (default: the model's source)",
    )
    parser.add_argument(
        "--shard-size",
        default="5GiB",
        help="largest safetensors file before the folder is sharded (default 5GiB)",
    )
    args = parser.parse_args(argv)
    from planners import parse_bytes

    kwargs = {"dtype": DTYPES[args.dtype], "tokenizer": args.tokenizer}
    try:
        kwargs["shard_bytes"] = parse_bytes(args.shard_size, "--shard-size")
        check_out(args.out)  # before any slow reading
        if args.checkpoint.startswith("hf:"):
            out = _export_pretrained(args.checkpoint, args.out, **kwargs)
        else:
            out = export_checkpoint(args.checkpoint, args.out, **kwargs)
    except (HFError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output folder cannot be written
        print(f"error: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
