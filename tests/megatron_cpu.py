"""TEST-ONLY CPU shim for megatron-core 0.16.1: redirects its CUDA-only calls so that models run on
CPU ranks with gloo. It never ships in the library path (`integrations/megatron` patches nothing);
`launch/examples/megatron_gpt.py` imports it only where no CUDA is available.

What it redirects, inside `megatron_on_cpu()` only (everything is restored on exit):
- `torch.cuda.current_device()` -> "cpu" (megatron allocates buffers on it);
- `device="cuda"` literals (the optimizer's scale and found-inf tensors, the schedules' token
  counts, the default causal mask) -> CPU, by a TorchFunctionMode on torch's factory functions;
- the RNG tracker's CUDA generator -> torch's CPU generator (`torch.cuda.get_rng_state`,
  `manual_seed` and the tracker's private get/set);
- `torch.cuda.synchronize()` (dist_checkpointing's save) -> nothing;
- megatron's torch norm under sequence parallelism: `WrappedTorchNorm` refuses it (apex or TE
  provide the norm there); here it builds the torch norm and marks its weights
  `sequence_parallel`, so that their gradients are summed over tensor-parallel ranks as
  megatron does for apex's.
Not covered (they stay GPU-only): gradient clipping (`clip_grad`, multi-tensor kernels), the
distributed optimizer, fp16/bf16 autocast, CUDA graphs, Transformer Engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["megatron_on_cpu"]


class _CudaLiteralsToCpu(TorchFunctionMode):
    """device='cuda' (or cuda:N) in a torch function's keywords -> 'cpu'; Tensor.cuda() -> self."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def _norm_new(cls, config, hidden_size: int, eps: float = 1e-5, *args, **kwargs):
    """WrappedTorchNorm.__new__ that accepts sequence parallelism (see the module doc)."""
    norm = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
    module = norm(normalized_shape=hidden_size, eps=eps)
    if config.sequence_parallel:
        for p in module.parameters():
            p.sequence_parallel = True
    return module


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Run megatron-core on CPU inside the block (a no-op where CUDA is available)."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    patches = [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        (mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (WrappedTorchNorm, "__new__", _norm_new),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        with _CudaLiteralsToCpu():
            yield
    finally:
        for owner, name, value in saved:
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
