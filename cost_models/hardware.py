"""Hardware descriptions for the cost models: peak rates, memory and links, with datasheet presets.

Pure Python (standard library only); `detect()` reads NVML when `pynvml` is present, else CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["DTYPES", "PRESETS", "Hardware", "Link", "detect", "get_preset"]

DTYPES: tuple[str, ...] = ("float32", "tf32", "bfloat16", "float16", "float64")
"""Dtype names `Hardware.peak_flops` may use as keys."""

_GIB = 2**30


def _positive(where: str, value: Any, *, integer: bool = False, zero_ok: bool = False) -> Any:
    """`value` as a finite float (int if integer) > 0 (>= 0 if zero_ok), else a ValueError."""
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    kinds = int if integer else int | float
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{where} must be {kind} {'>=' if zero_ok else '>'} 0, got {value!r}")
    return value if integer else float(value)


@dataclass(frozen=True)
class Link:
    """One kind of interconnect, as seen by one GPU taking part in a collective."""

    bandwidth: float
    """Achievable bus bandwidth per GPU in one direction, bytes/s."""
    latency: float
    """Fixed cost per message, seconds (0 allowed for idealised what-ifs)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidth", _positive("Link.bandwidth", self.bandwidth))
        object.__setattr__(self, "latency", _positive("Link.latency", self.latency, zero_ok=True))


@dataclass(frozen=True)
class Hardware:
    """One kind of device and how its copies are wired together."""

    name: str
    """Short name, e.g. a preset key."""
    memory_bytes: int
    """Device memory per device, bytes."""
    peak_flops: dict[str, float] = field(hash=False)
    """Dense matmul FLOP/s by dtype name (keys among DTYPES)."""
    memory_bandwidth: float
    """HBM or DRAM bandwidth, bytes/s."""
    intra_node: Link
    """Link between devices of one node (NVLink; shared memory for CPU ranks)."""
    inter_node: Link
    """Link between nodes (InfiniBand, Ethernet), per device."""
    devices_per_node: int
    """Devices in one node."""
    source: str
    """Where the numbers come from: a short citation."""
    launch_latency: float = 0.0
    """Seconds a kernel call takes at least: the host's cost of launching it, which a kernel
    shorter than that cannot hide (datasheet pricing only; a profile measures its own)."""
    collective_latency: float = 0.0
    """Fixed seconds of every collective call (p2p exchange steps included), on top of the link's
    per-hop latency (datasheet pricing only)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for key in ("name", "source"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"Hardware.{key} must be a non-empty string")
        for key in ("memory_bytes", "devices_per_node"):
            set_(self, key, _positive(f"Hardware.{key}", getattr(self, key), integer=True))
        for key in ("memory_bandwidth", "launch_latency", "collective_latency"):
            zero_ok = key != "memory_bandwidth"
            set_(self, key, _positive(f"Hardware.{key}", getattr(self, key), zero_ok=zero_ok))
        if not isinstance(self.peak_flops, Mapping) or not self.peak_flops:
            raise ValueError(
                f"Hardware.peak_flops must be a non-empty dict, got {self.peak_flops!r}"
            )
        unknown = sorted(str(k) for k in self.peak_flops if k not in DTYPES)
        if unknown:
            raise ValueError(f"Hardware.peak_flops: unknown dtypes {unknown}; known: {DTYPES}")
        peaks = {k: _positive(f"Hardware.peak_flops[{k!r}]", v) for k, v in self.peak_flops.items()}
        set_(self, "peak_flops", peaks)
        for key in ("intra_node", "inter_node"):
            if not isinstance(getattr(self, key), Link):
                raise ValueError(f"Hardware.{key} must be a Link, got {getattr(self, key)!r}")

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for a dtype name ("bfloat16", "torch.bfloat16" or a torch.dtype).

        "float32" is the plain fp32 rate; ask for "tf32" explicitly for the TF32 tensor cores."""
        key = str(dtype).removeprefix("torch.")
        if key not in self.peak_flops:
            known = ", ".join(sorted(self.peak_flops))
            raise ValueError(f"unknown dtype {str(dtype)!r} for {self.name}; known: {known}")
        return self.peak_flops[key]

    def link(self, group_size: int, nodes_spanned: int = 1) -> Link:
        """The link a collective over `group_size` ranks on `nodes_spanned` nodes is bound by."""
        _positive("link group_size", group_size, integer=True)
        if _positive("link nodes_spanned", nodes_spanned, integer=True) == 1:
            return self.intra_node
        return self.inter_node

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (nested dicts for the links); inverse of `from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hardware:
        """Build from `to_dict()` output; a missing, unknown or bad key is a one-line ValueError
        (the latency terms may be missing, from a dict written before they existed: 0)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"Hardware.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        optional = ("launch_latency", "collective_latency")
        missing = [n for n in names if n not in d and n not in optional]
        extra = sorted(str(k) for k in d if k not in names)
        if missing or extra:
            raise ValueError(f"Hardware.from_dict: missing keys {missing}, unknown keys {extra}")
        kwargs = dict(d)
        for key in ("intra_node", "inter_node"):
            link = d[key]
            if not isinstance(link, Mapping) or set(link) != {"bandwidth", "latency"}:
                raise ValueError(f"Hardware.from_dict: bad key {key!r}: {link!r}")
            kwargs[key] = Link(bandwidth=link["bandwidth"], latency=link["latency"])
        return cls(**kwargs)

    @staticmethod
    def detect() -> Hardware:
        """Same as the module-level `detect()`."""
        return detect()


def _gpu(
    name: str, gb: int, flops: tuple[float, ...], hbm: float, nv: float, ib: float, src: str
) -> Hardware:
    """An 8-GPU node; flops = (bf16 = fp16, tf32, fp32, fp64 tensor core), all dense; nv and ib
    are NVLink and InfiniBand bytes/s per GPU per direction; gb is decimal GB of memory."""
    peak = dict(
        zip(("bfloat16", "float16", "tf32", "float32", "float64"), flops[:1] + flops, strict=True)
    )
    note = "; link rates are theoretical, nccl-tests busbw is lower: profile to calibrate"
    return Hardware(
        name, gb * 10**9, peak, hbm, Link(nv, _NCCL_NVLINK_STEP), Link(ib, _NCCL_NET_STEP), 8,
        src + note + _LATENCY_SOURCE, launch_latency=_LAUNCH, collective_latency=_NCCL_CALL,
    )  # fmt: skip


# The latency terms of the GPU presets. NCCL's own cost model for a ring collective with the
# Simple protocol (NVIDIA/nccl src/graph/tuning.cc at b6475625: baseLat 8.4 us, hwLat 3.4 us per
# NVLink step and 14 us per network step); a kernel launch at 5 us, the low end of the 5-20 us
# of host launch time HolisticTraceAnalysis's docs give (facebookresearch/HolisticTraceAnalysis,
# docs/source/features/cuda_kernel_launch_stats.rst).
_NCCL_CALL, _NCCL_NVLINK_STEP, _NCCL_NET_STEP, _LAUNCH = 8.4e-6, 3.4e-6, 14e-6, 5e-6
_LATENCY_SOURCE = (
    "; latencies: NCCL's ring/Simple cost model (src/graph/tuning.cc: 8.4 us a call, 3.4 us an"
    " NVLink step, 14 us a network step), 5 us a kernel launch (HolisticTraceAnalysis docs: 5-20"
    " us, the low end)"
)


_H100 = (989e12, 494e12, 67e12, 67e12)
_NVLINK4_NDR = "NVLink4 900 GB/s total = 450 GB/s per direction; InfiniBand NDR 400 Gb/s = 50 GB/s"

PRESETS: dict[str, Hardware] = {
    "a100-80g-nvlink": _gpu(
        "a100-80g-nvlink", 80, (312e12, 156e12, 19.5e12, 19.5e12), 2.039e12, 300e9, 25e9,
        "NVIDIA A100 datasheet (2021), 80GB SXM: 312 TFLOP/s bf16/fp16 dense, 19.5 fp32 (156 tf32),"
        " 19.5 fp64 tensor core, 2039 GB/s HBM2e, NVLink3 600 GB/s total = 300 GB/s per direction;"
        " InfiniBand HDR 200 Gb/s = 25 GB/s per GPU",
    ),
    "h100-sxm": _gpu(
        "h100-sxm", 80, _H100, 3.35e12, 450e9, 50e9,
        "NVIDIA H100 datasheet (2023), SXM5 80GB: 989 TFLOP/s bf16/fp16 dense, 67 fp32 (494 tf32),"
        f" 67 fp64 tensor core, 3.35 TB/s HBM3, {_NVLINK4_NDR} per GPU",
    ),
    "h200": _gpu(
        "h200", 141, _H100, 4.8e12, 450e9, 50e9,
        "NVIDIA H200 datasheet (2024), SXM 141GB: compute as H100 SXM (989 TFLOP/s bf16 dense,"
        f" 67 fp32, 494 tf32), 4.8 TB/s HBM3e, {_NVLINK4_NDR} per GPU",
    ),
    "cpu": Hardware(
        "cpu", 16 * _GIB, {"float32": 1e11, "float64": 1e11, "bfloat16": 1e11}, 2e10,
        Link(5e9, 2e-5), Link(1.25e9, 5e-5), 1,
        "generic laptop/desktop CPU, order-of-magnitude guesses: 1e11 FLOP/s for a few cores with"
        " AVX2 FMA, 20 GB/s DRAM, loopback TCP/shared memory 5 GB/s, 10 GbE between hosts; profile"
        " real CPUs (python -m cost_models.profile). One process per socket is the usual CPU"
        " setting; gloo ranks on one host use the intra-node link",
    ),
}  # fmt: skip

# Substring of the upper-cased NVML device name -> preset; first match wins.
_GPU_NAMES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80g-nvlink"))


def get_preset(name: str) -> Hardware:
    """The preset called `name`; an unknown name raises a one-line ValueError listing presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown hardware preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _physical_memory() -> int:
    """Physical RAM in bytes from sysconf, or 16 GiB where that is not available."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 * _GIB
    return total if isinstance(total, int) and total > 0 else 16 * _GIB


def _cpu(reason: str) -> Hardware:
    """The cpu preset with this machine's RAM, saying in `source` why no GPU was used."""
    cpu = PRESETS["cpu"]
    return replace(cpu, memory_bytes=_physical_memory(), source=f"{cpu.source}; detected: {reason}")


def _one_line(error: BaseException) -> str:
    """`Type: first line of the message` of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def detect() -> Hardware:
    """Describe this machine: NVML's device 0 matched to a preset, else the cpu preset.

    Never raises for a missing `pynvml`, driver or GPU: that is the expected case on CPU hosts."""
    try:
        import pynvml
    except ImportError:
        return _cpu("pynvml (nvidia-ml-py) not installed")
    nvml_error = getattr(pynvml, "NVMLError", Exception)
    try:
        pynvml.nvmlInit()
    except (nvml_error, OSError) as error:
        return _cpu(f"nvmlInit failed ({_one_line(error)})")
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        if count <= 0:
            return _cpu("NVML reports no devices")
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        gpu = pynvml.nvmlDeviceGetName(handle)
        gpu = gpu.decode(errors="replace") if isinstance(gpu, bytes) else str(gpu)
        memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except (nvml_error, OSError) as error:
        return _cpu(f"NVML query failed ({_one_line(error)})")
    finally:
        with contextlib.suppress(nvml_error, OSError):
            pynvml.nvmlShutdown()
    key = next((k for sub, k in _GPU_NAMES if sub in gpu.upper()), None)
    if key is None:
        preset = PRESETS["h100-sxm"]
        note = f"unknown GPU {gpu}: rates are H100 placeholders; run python -m cost_models.profile"
        name, source = gpu or "unknown-gpu", f"{note}; {preset.source}"
    else:
        preset = PRESETS[key]
        name, source = key, f"{preset.source}; detected: {gpu}"
    return replace(preset, name=name, memory_bytes=memory, devices_per_node=count, source=source)
