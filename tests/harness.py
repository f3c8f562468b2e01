"""Persistent multi-process gloo worker pools for distributed tests on CPU.

Starting a process that imports torch costs about a second, so every world size gets one pool of
spawned workers per pytest session, reused by every test. ``run_distributed`` ships a task to each
rank and returns the per-rank results. Any failure becomes a ``RemoteError`` in the test; a pool
that may be stuck in a collective (or lost a rank) is killed, and the next call builds a fresh one.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_PERIOD_S = 10.0  # after one rank fails, how long the others may take to finish
START_TIMEOUT_S = 120.0  # spawn + import torch + init_process_group, on a loaded machine


class RemoteError(AssertionError):
    """A rank raised, died or did not answer; the message names the ranks and has their tracebacks.

    It is an AssertionError so that pytest reports a failing distributed test as a plain failure.
    """


class RemoteTimeout(RemoteError):
    """No rank failed, but some did not answer within the timeout: most likely a deadlock."""


def _exit_with_parent(parent_pid: int) -> None:
    """Kill this worker once the test process is gone, even while it blocks in a collective."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker(rank: int, world_size: int, port: int, conn: Connection, stack_path: str) -> None:
    """Worker main: join the gloo group once, then run pickled (fn, args, kwargs) tasks till killed.

    Messages are pickled explicitly (bytes on the pipe) so tensors travel by copy: Connection.send
    would use torch's shared-memory reductions, which break when a worker is killed right after.
    """
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True")  # the store is the test process's
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the test process's business
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    stack_file = open(stack_path, "w")  # noqa: SIM115 - must stay open for faulthandler
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        import torch  # imported here, after OMP_NUM_THREADS is set
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        return
    conn.send_bytes(pickle.dumps(("ok", None)))
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:  # the test process went away
            return
        try:
            fn, args, kwargs = pickle.loads(payload)
            reply = pickle.dumps(("ok", fn(*args, **kwargs)))
        except BaseException:
            reply = pickle.dumps(("error", traceback.format_exc()))
        conn.send_bytes(reply)


class _Pool:
    """`world_size` spawned workers that share one gloo process group on their own MASTER_PORT."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        # The pool's rendezvous store lives here, on a port the OS picks and that stays bound: no
        # race for a "free" port, and no cross-talk between pools. The workers are all clients
        # (TORCHELASTIC_USE_AGENT_STORE, as under torchrun).
        from torch.distributed import TCPStore

        self.store: Any = TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False
        )
        port = self.store.port
        self.stack_dir = tempfile.mkdtemp(prefix=f"gloo-pool-ws{world_size}-")
        try:
            for rank in range(world_size):
                ours, theirs = ctx.Pipe()
                stack_path = os.path.join(self.stack_dir, f"rank{rank}.txt")
                args = (rank, world_size, port, theirs, stack_path)
                self.procs.append(ctx.Process(target=_worker, args=args, daemon=True))
                self.procs[-1].start()
                theirs.close()  # so that our end reads EOF as soon as the worker dies
                self.conns.append(ours)
            self._check(self._gather(START_TIMEOUT_S), "starting the pool", START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, payload: bytes, name: str, timeout: float) -> list[Any]:
        __tracebackhide__ = True
        for conn in self.conns:
            conn.send_bytes(payload)
        return self._check(self._gather(timeout), name, timeout)

    def _gather(self, timeout: float) -> tuple[dict[int, Any], dict[int, str], list[int]]:
        """Wait for one reply per rank: (results, failures, ranks that never answered).

        A failure cuts the wait to GRACE_PERIOD_S: the other ranks are probably blocked in a
        collective with the failed rank and will never answer.
        """
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        while pending and (remaining := deadline - time.monotonic()) > 0:
            ready = wait([self.conns[r] for r in pending], remaining)
            for rank in [r for r in sorted(pending) if self.conns[r] in ready]:
                pending.discard(rank)
                try:
                    status, value = pickle.loads(self.conns[rank].recv_bytes())
                except EOFError:
                    self.procs[rank].join(5.0)
                    code = self.procs[rank].exitcode
                    status, value = "error", f"worker process died (exit code {code}), see stderr\n"
                except Exception:  # e.g. the result's class cannot be imported here
                    status, value = "error", f"unpicklable result:\n{traceback.format_exc()}"
                if status == "ok":
                    results[rank] = value
                else:
                    failures[rank] = value
                    deadline = min(deadline, time.monotonic() + GRACE_PERIOD_S)
        return results, failures, sorted(pending)

    def _check(self, gathered: tuple[dict, dict, list[int]], what: str, timeout: float) -> Any:
        """Return the results in rank order, or kill the pool if it is unusable and raise."""
        __tracebackhide__ = True  # pytest: show the test and the message, not harness internals
        results, failures, pending = gathered
        if not failures and not pending:
            return [results[r] for r in range(self.world_size)]
        stacks = self._stacks(pending)
        if pending or not self.alive():
            self.kill()
        head = f"world_size={self.world_size}, {what}: "
        if not failures:
            waited = f"within {timeout:g} s (deadlock?)"
            raise RemoteTimeout(f"{head}ranks {pending} did not answer {waited}; {stacks}")
        parts = [f"--- rank {r} failed ---\n{tb}" for r, tb in sorted(failures.items())]
        if pending:
            waited = f"within the {GRACE_PERIOD_S:g} s grace period"
            parts.append(f"--- ranks {pending} did not answer {waited}; {stacks}")
        raise RemoteError(f"{head}rank(s) {sorted(failures)} failed\n" + "\n".join(parts))

    def _stacks(self, ranks: list[int]) -> str:
        """Python stacks of the given (stuck) ranks, dumped by faulthandler on SIGUSR1."""
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[rank].pid, signal.SIGUSR1)
        time.sleep(0.5 if ranks else 0.0)  # the dump is written from a signal handler
        texts = ["pool killed\n"]
        for rank in ranks:
            with open(os.path.join(self.stack_dir, f"rank{rank}.txt")) as f:
                blocks = f.read().strip().split("\n\n")  # one block per Python thread
            main = "\n\n".join(b for b in blocks if "_exit_with_parent" not in b)
            main = main.split(" in _worker\n")[0] + " in _worker"  # drop multiprocessing frames
            texts.append(f"rank {rank} was blocked in:\n{main}\n")
        return "".join(texts)

    def kill(self) -> None:
        """Kill every worker (idle or stuck alike: there is no state worth a clean exit)."""
        started = [proc for proc in self.procs if proc.pid is not None]
        for proc in started:
            proc.kill()
        for proc in started:
            proc.join()
        for conn in self.conns:
            conn.close()
        self.store = None  # stops the store server, frees the port
        shutil.rmtree(self.stack_dir, ignore_errors=True)


_POOLS: dict[int, _Pool] = {}


def run_distributed(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, **kwargs: Any
) -> list[Any]:
    """Run fn(*args, **kwargs) on every rank of a persistent gloo pool of `world_size` workers;
    return the per-rank return values in rank order. fn must be importable by name (a module-level
    function) and its results picklable (detach tensors and move them to CPU)."""
    __tracebackhide__ = True
    try:
        payload = pickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise TypeError(f"run_distributed needs a module-level fn and picklable args: {e}") from e
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        _POOLS.pop(world_size, None)  # if starting the new pool fails, the next call tries again
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(payload, f"{fn.__module__}.{fn.__qualname__}", timeout)
    except RemoteError:
        raise
    except BaseException:  # e.g. Ctrl-C while waiting: replies may still be in flight
        pool.kill()
        raise
    finally:
        if not pool.alive():
            _POOLS.pop(world_size, None)


def shutdown_pools() -> None:
    """Stop every pool, so that no worker outlives the test session."""
    while _POOLS:
        _POOLS.popitem()[1].kill()


atexit.register(shutdown_pools)
