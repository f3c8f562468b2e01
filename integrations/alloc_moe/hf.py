"""Alloc-MoE on Hugging Face transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V2; tested against transformers 4.57.3): the routing decision of every sparse MoE block
is replaced by a ParaDySe router hook (`parallel_lib.routing.RouterHook`), and only the pairs it
keeps are computed; shared experts, gates and scaling factors stay as the family defines them.

    moe = moe_layers_of_hf(model)                      # MoeLayers: layers 0..L-1, top_k, experts
    ks = allocate_layers(S, budget)                    # Alloc-L (S: L x top_k, e.g. profiled)
    with apply_router_hook(model, AllocT(ks, layers=moe.layers)) as handle:
        model.generate(...)                            # Alloc-L + Alloc-T
    handle.counts                                      # expert matmuls and rows per MoE layer

`request.layer` is the block's MoE index, 0..L-1 in depth order (`numbering="decoder"`: the
decoder-layer index instead); `MoeBlock.decoder_layer` says which decoder layer each block is.
A request carries the block's own probabilities, its top_k and whether it renormalises, the real
tokens (the model's 2-D attention mask where one is passed, else all), each token's batch row
(`seq_index`) and the real tokens per row (`seq_lens`); per family see `hf_families`. At the full
budget (the identity `top_k_routing`, `LayerTopK(top_k)`, `AllocT` at K_l = top_k) the logits
are those of the unpatched model bit for bit. With padding in the attention mask the padding gets
no expert row, which the model itself spends on it; the real tokens' logits then differ by float
rounding alone (a CPU matmul's result for a row depends on the other rows of its batch).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from parallel_lib.routing import RouterHook, RouterRequest, check_routing, top_k_routing

from .files import MoeLayers
from .hf_families import FAMILIES, Family, family_of, pair_slots

__all__ = [
    "TESTED_TRANSFORMERS",
    "ExpertCount",
    "MoeBlock",
    "RouterHandle",
    "apply_router_hook",
    "hf_moe_blocks",
    "moe_layers_of_hf",
]

TESTED_TRANSFORMERS = "4.57.3"
"""The transformers version whose block forwards `hf_families` reproduces (setup.py pins it)."""

NUMBERINGS = ("moe", "decoder")


@dataclass(frozen=True)
class MoeBlock:
    """One sparse MoE block of a transformers model."""

    index: int
    """MoE index, 0..L-1 in depth order."""
    decoder_layer: int
    """Index of the decoder layer the block is the MLP of."""
    name: str
    """Module path, e.g. model.layers.3.mlp."""
    family: Family = field(repr=False)
    module: nn.Module = field(repr=False, compare=False)

    def layer_id(self, numbering: str) -> int:
        """`RouterRequest.layer` of the block under `numbering` (moe | decoder)."""
        return self.index if numbering == "moe" else self.decoder_layer


@dataclass
class ExpertCount:
    """What the patched block of one MoE layer computed (every call, since the last reset)."""

    layer: int
    """`RouterRequest.layer` of the block."""
    decoder_layer: int
    forwards: int = 0
    """Calls of the block."""
    tokens: int = 0
    """Real tokens routed (T summed over calls)."""
    calls: int = 0
    """Expert matmuls run: experts with at least one row, summed over calls."""
    rows: int = 0
    """(token, expert) rows the experts computed: activations, summed over calls."""


def _decoder_index(name: str, fallback: int) -> int:
    """The decoder-layer index in a module path: the number after `layers`, else the first."""
    parts = name.split(".")
    numbers = [int(p) for p in parts if p.isdigit()]
    for before, part in zip(parts, parts[1:], strict=False):
        if before == "layers" and part.isdigit():
            return int(part)
    return numbers[0] if numbers else fallback


def hf_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """The sparse MoE blocks of `model` in depth order (module registration order);
    ValueError, one line, when there is none or a block's config is not implemented."""
    found = [(name, module, family) for name, module in model.named_modules()
             if (family := family_of(module)) is not None]  # fmt: skip
    if not found:
        known = ", ".join(f"{f.name} ({f.block})" for f in FAMILIES)
        raise ValueError(
            f"no sparse MoE block found in {type(model).__name__}: the adapter knows {known}"
        )
    blocks = []
    for i, (name, module, family) in enumerate(found):
        family.check(module)
        blocks.append(MoeBlock(i, _decoder_index(name, i), name, family, module))
    return blocks


def _check_numbering(numbering: str) -> None:
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be {' | '.join(NUMBERINGS)}, got {numbering!r}")


def moe_layers_of_hf(model: nn.Module, *, numbering: str = "moe") -> MoeLayers:
    """`MoeLayers` of a transformers MoE model (as `files.moe_layers_of` for ParaDySe models):
    the blocks' `RouterRequest.layer` ids, top_k and expert count; ValueError, one line, for a
    model without MoE blocks or blocks of unequal top_k or expert count."""
    _check_numbering(numbering)
    blocks = hf_moe_blocks(model)
    shapes = {(b.family.top_k(b.module), b.family.experts(b.module)) for b in blocks}
    if len(shapes) > 1:
        raise ValueError(f"Alloc-MoE needs one top_k and expert count in every MoE block: {shapes}")
    ((top_k, experts),) = shapes
    return MoeLayers(tuple(b.layer_id(numbering) for b in blocks), top_k, experts)


class _MaskCapture:
    """Keeps the 2-D attention mask of the latest call of the model that runs the blocks (a
    forward pre-hook), for the blocks' `real` tokens; None when the call passed none. It is
    kept after the call, so that a block recomputed in the backward (gradient checkpointing)
    routes as in the forward; a block called on its own uses the latest model call's mask
    where the shapes fit."""

    def __init__(self, module: nn.Module) -> None:
        self.mask: Tensor | None = None
        try:
            params = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self.position = params.index("attention_mask") if "attention_mask" in params else None
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def real(self, batch: int, length: int, device) -> Tensor:
        """(batch length,) bool: the real tokens of a block input (batch, length, H); the
        mask's last `length` columns (its earlier ones are the cached past while decoding)."""
        mask = self.mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return torch.ones(batch * length, dtype=torch.bool, device=device)
        return mask[:, -length:].to(device=device, dtype=torch.bool).reshape(-1)


class _PatchedForward:
    """The forward put on one block: the family's routing, the hook, the kept pairs."""

    def __init__(self, handle: RouterHandle, block: MoeBlock, count: ExpertCount) -> None:
        self.handle, self.block, self.count = handle, block, count

    def _add_rows(self, rows: int) -> None:
        self.count.calls += 1
        self.count.rows += rows

    def __call__(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        family, module = self.block.family, self.block.module
        hidden = family.prepare(module, hidden_states)
        batch, length, H = hidden.shape
        x = hidden.view(-1, H)  # (b, s, H) -> (b s, H)
        own = family.route(module, x)
        real = self.handle.masks.real(batch, length, x.device)
        seq_index = torch.arange(batch, device=x.device).repeat_interleave(length)
        request = RouterRequest(
            layer=self.count.layer,
            probs=own.probs,
            logits=own.logits,
            top_k=family.top_k(module),
            renormalize=family.renormalize(module),
            real=real,
            seq_index=seq_index,
            seq_lens=tuple(real.view(batch, length).sum(1).tolist()),
        )
        routing = (self.handle.hook or top_k_routing)(request)
        try:
            check_routing(routing, x.shape[0], family.experts(module))
        except ValueError as error:
            raise ValueError(f"MoE layer {self.count.layer} ({self.block.name}): {error}") from None
        self.count.forwards += 1
        self.count.tokens += int(real.sum())
        slot = pair_slots(routing, own.selection)
        return family.output(module, hidden, x, routing, slot, own, self._add_rows)


class RouterHandle:
    """The patch of `apply_router_hook`: `remove()` (or leaving a `with` block) restores every
    block's own forward. `hook` may be swapped between calls (None: the family's own top-k)."""

    def __init__(self, model: nn.Module, hook: RouterHook | None, numbering: str) -> None:
        _check_numbering(numbering)
        self.blocks = tuple(hf_moe_blocks(model))
        self.moe = moe_layers_of_hf(model, numbering=numbering)
        self.hook = hook
        self.counts = [ExpertCount(b.layer_id(numbering), b.decoder_layer) for b in self.blocks]
        for b in self.blocks:
            if isinstance(b.module.__dict__.get("forward"), _PatchedForward):
                raise ValueError(
                    f"{b.name} already has a router hook: remove() the first handle before "
                    "applying another (or set handle.hook)"
                )
        base = self.blocks[0].name.rpartition(".layers.")[0]
        self.masks = _MaskCapture(model.get_submodule(base) if base else model)
        self._missing = object()  # a block without an instance forward of its own
        self._saved = [b.module.__dict__.get("forward", self._missing) for b in self.blocks]
        for block, count in zip(self.blocks, self.counts, strict=True):
            block.module.forward = _PatchedForward(self, block, count)
        self.removed = False

    def reset_counts(self) -> None:
        for count in self.counts:
            count.forwards = count.tokens = count.calls = count.rows = 0

    def remove(self) -> None:
        """Restore the blocks' forwards and drop the mask capture (idempotent)."""
        if self.removed:
            return
        for block, saved in zip(self.blocks, self._saved, strict=True):
            if saved is self._missing:
                del block.module.forward
            else:
                block.module.forward = saved
        self.masks.handle.remove()
        self.removed = True

    def __enter__(self) -> RouterHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_router_hook(
    model: nn.Module,
    hook: RouterHook | Callable[[RouterRequest], object] | None,
    *,
    numbering: str = "moe",
) -> RouterHandle:
    """Route every sparse MoE block of `model` with `hook` (None: the family's own top-k, for
    counting) and compute only the pairs it keeps: an expert without a pair runs no matmul.
    `numbering`: `RouterRequest.layer` is the MoE index 0..L-1 (moe) or the decoder-layer
    index (decoder); use `moe_layers_of_hf(model, numbering=...).layers` for per-layer hooks.
    Returns the handle (`remove()`, `counts`); ValueError, one line, for a model without a
    supported MoE block, a config the adapter does not implement, or blocks already hooked."""
    import transformers

    if transformers.__version__ != TESTED_TRANSFORMERS:
        warnings.warn(
            f"integrations.alloc_moe.hf reproduces the MoE blocks of transformers "
            f"{TESTED_TRANSFORMERS}, this is {transformers.__version__}: check that the full "
            "budget still gives the model's own logits",
            stacklevel=2,
        )
    return RouterHandle(model, hook, numbering)
