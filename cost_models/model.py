"""`CostModel`: analytic counts x profiled (or datasheet) rates -> time and memory (DESIGN 6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .counts import Kernel, dtype_name, layer_counts
from .hardware import Hardware
from .memory import layer_memory
from .moe_costs import moe_layer_counts
from .moe_memory import moe_layer_memory
from .profile_data import LinkFit, Profile
from .strategy_costs import strategy_cost

__all__ = ["Cost", "StepCost", "CostModel", "DATASHEET_EFFICIENCY"]

DATASHEET_EFFICIENCY = {"matmul": 0.7, "attention_forward": 0.5, "attention_backward": 0.4}
"""Fractions of the datasheet peak assumed without a profile (typical of large GEMMs and of
flash attention on A100/H100); a profile replaces them with measured rates. Without a profile a
matmul or attention call also takes at least the hardware's `launch_latency`, and a collective
call its `collective_latency` beyond the per-hop latency; memory-bound kernels are priced by
their bytes only (their launches are not counted)."""


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one layer on one rank for one micro-batch."""

    forward_s: float
    backward_s: float
    """Backward including the recomputation."""
    compute_s: float
    """Analytic compute time, forward and backward, before overlap and calibration."""
    comm_s: float
    """Analytic communication time before overlap and calibration."""
    saved_bytes: int
    transient_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    comm_bytes: int
    """Bytes this rank sends, forward and backward."""
    flops: float

    @property
    def time_s(self) -> float:
        return self.forward_s + self.backward_s


@dataclass(frozen=True)
class StepCost:
    time_s: float
    peak_bytes: int


class CostModel:
    """Predicts layer and step costs. With a profile the rates are the measured ones (the
    machine, backend and dtype it was made on); without one they come from `hardware`'s
    datasheet numbers x `DATASHEET_EFFICIENCY`, for what-if questions about machines you do not
    have."""

    def __init__(self, hardware: Hardware, profile: Profile | None = None) -> None:
        self.hardware, self.profile = hardware, profile

    # ------------------------------------------------------------------ rates
    def kernel_seconds(self, k: Kernel, direction: str, dtype) -> float:
        """Seconds of `k.count` calls of one kernel ('forward' or 'backward' curves)."""
        if self.profile is not None:
            if k.kind == "matmul":
                curve = self.profile.matmul
            else:
                curve = self.profile.attention(direction, causal=k.shape[3])
            return k.count * curve(k.flops)
        name = "matmul" if k.kind == "matmul" else f"attention_{direction}"
        rate = self.hardware.flops(dtype) * DATASHEET_EFFICIENCY[name]
        return k.count * max(k.flops / rate, self.hardware.launch_latency)

    @property
    def reduce_scatter_copy(self) -> bool:
        """The backend copies a reduce-scatter's input: the profile's backend, else gloo's on the
        CPU preset (nccl does not)."""
        if self.profile is not None:
            return self.profile.reduce_scatter_copy
        return self.hardware.name.startswith("cpu")

    def _elementwise_seconds(self, nbytes: float) -> float:
        if self.profile is not None:
            return self.profile.elementwise(nbytes, calls=0)
        return nbytes / self.hardware.memory_bandwidth

    def _link(self, kind: str, group_size: int, nodes_spanned: int) -> LinkFit:
        if self.profile is not None:
            return self.profile.collective(kind, group_size)
        link = self.hardware.link(group_size, nodes_spanned)
        hops = 1 if kind == "p2p" else group_size - 1  # ring algorithms: P-1 latency steps
        alpha = self.hardware.collective_latency + hops * link.latency
        return LinkFit(alpha=alpha, beta=link.bandwidth)

    def collective_seconds(
        self, kind: str, group_size: int, nbytes: float, calls: int, nodes_spanned: int = 1
    ) -> float:
        """Seconds of `calls` collectives of `kind` sending `nbytes` in all over `group_size`
        ranks (the profile's fit, or the hardware's link)."""
        return self._link(kind, group_size, nodes_spanned)(nbytes, calls)

    def _comm_seconds(self, volume: dict, messages: dict, sizes: dict, nodes: int) -> dict:
        return {
            kind: self._link(kind, sizes.get(kind, 1), nodes)(nbytes, messages.get(kind, 0))
            for kind, nbytes in volume.items()
        }

    def _traffic_seconds(self, volume, messages, group_volume, group_messages, sizes, P,
                         nodes) -> dict:  # fmt: skip
        """Seconds per collective kind: the strategy's collectives over its groups (`sizes`),
        those that span the whole group (a MoE layer's dispatch) over P ranks."""
        own = {k: v - group_volume.get(k, 0) for k, v in volume.items()}
        own_messages = {k: v - group_messages.get(k, 0) for k, v in messages.items()}
        seconds = self._comm_seconds({k: v for k, v in own.items() if v}, own_messages, sizes,
                                     nodes)  # fmt: skip
        whole = self._comm_seconds(group_volume, group_messages, dict.fromkeys(group_volume, P),
                                   nodes)  # fmt: skip
        for kind, value in whole.items():
            seconds[kind] = seconds.get(kind, 0.0) + value
        return seconds

    def scales(self, key: str, fallback: str | None = None) -> tuple[float, float]:
        """(forward, backward) calibration scales of `key` (a strategy, or 'gN:STRATEGY' on
        sub-groups of N), else of `fallback`; 1 without a profile, or for key ''."""
        return self._calibrated("calibration", key, fallback, 1.0)

    def overheads(self, key: str, fallback: str | None = None) -> tuple[float, float]:
        """(forward, backward) seconds a layer step of `key` takes beyond its scaled analytic
        time (the profile's `calibration_overhead`, as `scales` finds its scales); 0 without."""
        return self._calibrated("calibration_overhead", key, fallback, 0.0)

    def _calibrated(self, field: str, key: str, fallback: str | None, default: float):
        if self.profile is None or not key:
            return default, default
        table = getattr(self.profile, field)
        found = table.get(key)
        if found is None and fallback is not None and key not in self.profile.calibration:
            found = table.get(fallback)  # the fallback's whole calibration, never a mix
        return found or (default, default)

    def shared_cores(self, P: int, nodes_spanned: int = 1) -> float | None:
        """How many ranks of an sp group of P can compute at once, where that is fewer than P:
        the profile's usable CPUs over threads per rank, the group's share of them where more
        ranks than the group's ran on the host (`Profile.conditions`). None where every rank
        has its own device or cores (a GPU, no profile, a group across nodes): then the slowest
        sub-group sets the time. With fewer, a sub-group that finishes early hands its cores to
        the others (`group_size.shared_makespan`)."""
        profile = self.profile
        if profile is None or profile.machine.get("device") != "cpu" or nodes_spanned != 1:
            return None  # GPUs compute on their own, whatever the host's CPU count
        conditions = profile.conditions
        cpus, here = conditions.get("cpus_usable"), conditions.get("ranks_here")
        if not cpus or not here:
            return None
        slots = cpus / max(int(conditions.get("torch_threads") or 1), 1)
        cores = slots * min(P, here) / here
        return cores if cores < min(P, here) else None

    # ------------------------------------------------------------------ layer
    def layer_cost(
        self,
        shape,
        strategy: str,
        recompute: str,
        seq_lens: Sequence[int],
        P: int,
        *,
        dtype="float32",
        inner: int | None = None,
        nodes_spanned: int = 1,
        trainable: bool = True,
        moe=None,
        moe_loads=None,
        calibration: str | None = None,
    ) -> Cost:
        """One layer's forward and backward on one rank of a group of P for a micro-batch of
        `seq_lens` (unpadded lengths). trainable False: a frozen layer (no weight gradients).
        `moe` (a `parallel_lib.moe.MoeShape` or anything with its fields): a mixture-of-experts
        layer, priced for the routing `moe_loads` (`cost_models.moe_costs.MoeLoads`, the rank
        computing the most expert rows) or, None, the planning expectation (uniform loads).
        `calibration`: the profile's calibration entry that scales the time (default: the
        strategy's; '' for none)."""
        if self.profile is not None:
            self.profile.check_matches(dtype=dtype_name(dtype))
        kw = {"dtype": dtype, "recompute": recompute, "inner": inner, "trainable": trainable}
        rs_copy = self.reduce_scatter_copy
        if moe is None:
            counts = layer_counts(shape, strategy, seq_lens, P, **kw)
            memory = layer_memory(shape, strategy, seq_lens, P, reduce_scatter_copy=rs_copy, **kw)
        else:
            counts = moe_layer_counts(shape, moe, strategy, seq_lens, P, loads=moe_loads, **kw)
            memory = moe_layer_memory(shape, moe, strategy, seq_lens, P, loads=moe_loads,
                                      reduce_scatter_copy=rs_copy, **kw)  # fmt: skip
        description = strategy_cost(strategy)
        sizes = description.group_sizes(P, inner)
        key = strategy if calibration is None else calibration
        scales, overheads = self.scales(key), self.overheads(key)
        phases, compute_total, comm_total = [], 0.0, 0.0
        for direction, kernels, elementwise, traffic, scale, overhead in (
            ("forward", counts.kernels_forward, counts.elementwise_forward,
             (counts.bytes_forward, counts.messages_forward, counts.group_bytes_forward,
              counts.group_messages_forward), scales[0], overheads[0]),
            ("backward", counts.kernels_backward, counts.elementwise_backward,
             (counts.bytes_backward, counts.messages_backward, counts.group_bytes_backward,
              counts.group_messages_backward), scales[1], overheads[1]),
        ):  # fmt: skip
            priced = [(k, direction) for k in kernels]
            if direction == "backward":  # recomputation runs forward kernels
                priced += [(k, "forward") for k in counts.kernels_recomputed]
            attention = sum(
                self.kernel_seconds(k, d, dtype) for k, d in priced if k.kind == "attention"
            )
            matmul = sum(self.kernel_seconds(k, d, dtype) for k, d in priced if k.kind == "matmul")
            other = self._elementwise_seconds(elementwise)
            comm = self._traffic_seconds(*traffic, sizes, P, nodes_spanned)
            p2p = comm.pop("p2p", 0.0)
            blocking = sum(comm.values())
            overlap = self.profile.overlap if self.profile is not None else 1.0
            hidden = overlap * min(description.p2p_hidden_under(matmul, attention), p2p)
            time = matmul + attention + p2p - hidden + other + blocking
            phases.append(scale * time + overhead)
            compute_total += matmul + attention + other
            comm_total += blocking + p2p
        return Cost(
            forward_s=phases[0],
            backward_s=phases[1],
            compute_s=compute_total,
            comm_s=comm_total,
            saved_bytes=memory.saved,
            transient_bytes=memory.transient,
            forward_peak_bytes=memory.forward_peak,
            backward_peak_bytes=memory.backward_peak,
            comm_bytes=sum(counts.bytes_forward.values()) + sum(counts.bytes_backward.values()),
            flops=counts.flops,
        )

    # ------------------------------------------------------------------ model
    @staticmethod
    def step(
        layers: Sequence[Cost], static_bytes: int = 0, extra_s: float = 0.0, head_bytes: int = 0
    ) -> StepCost:
        """A micro-batch through a stack of layers: times add; memory is the static bytes, every
        layer's saved bytes and the largest transient (DESIGN 7's constraint), where the LM
        head's logits (`head_bytes`, see `static.logits_bytes`) are one more transient, live
        while every layer's saved bytes are."""
        time = sum(c.time_s for c in layers) + extra_s
        peak = static_bytes + sum(c.saved_bytes for c in layers)
        peak += max([c.transient_bytes for c in layers] + [head_bytes])
        return StepCost(time_s=time, peak_bytes=int(peak))
