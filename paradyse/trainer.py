"""The training run behind `paradyse-train`: set up from a Config, check feasibility, loop.

Set-up order (each failure is one line and an exit code, raised as `RunError`): mesh and the
model's fit to sp -> data source -> cost-model profile -> planner -> the longest sequence the
exact planner fits in the budget (longer documents are split there, whatever the strategy, so
every strategy trains on the same data) -> the chosen strategy must fit the fullest micro-batch
-> model and engine.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from cost_models import Hardware, Profile, detect
from parallel_lib import pad_length
from planners import InfeasibleError, Planner, format_bytes, parse_bytes

from .checkpoint import MANIFEST, Checkpointer, CheckpointError, checked_checkpoint
from .config import Config
from .data import DataError, GlobalBatches, assign_to_dp, micro_batches, open_source
from .engine import Engine, LayerHooks, OptimizerWrapper, StepResult
from .mesh import Mesh, init_mesh, rank0_value
from .metrics import MetricsWriter, Progress, step_record, summary_lines
from .model import DecoderModel
from .planning import ADAPTIVE, build_planner, resolve_profile

__all__ = ["RunError", "Trainer", "EXIT_USAGE", "EXIT_MEMORY"]

EXIT_USAGE = 2
"""Bad config, data path, flag or model shape."""
EXIT_MEMORY = 3
"""No plan (or not the chosen static strategy) fits the memory budget."""


class RunError(Exception):
    """A problem the user can fix: `message` is one line, `code` the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class Trainer:
    """Builds everything a run needs from `config` (collective: every rank constructs it)."""

    def __init__(
        self,
        config: Config,
        *,
        mesh: Mesh | None = None,
        hooks: list[LayerHooks] = (),
        optimizer_wrapper: OptimizerWrapper | None = None,
        log=print,
        warn=None,
    ) -> None:
        self.config, self.log = config, log
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        par, data, train = config.parallel, config.data, config.train
        if mesh is None:
            try:
                mesh = init_mesh(par.sp or None)
            except ValueError as error:
                raise RunError(f"parallel.sp: {error}") from None
        self.mesh = mesh
        problem = config.model.sp_problem(mesh.sp)
        if problem:
            raise RunError(f"the model cannot be split over sp={mesh.sp}: {problem}")
        resume_from = self._checkpoint_to_resume()  # checked before the slow set-up
        self.dtype = getattr(torch, train.dtype)
        try:
            self.source = open_source(
                data.source, path=data.path, tokenizer=data.tokenizer, vocab=config.model.vocab,
                field=data.field, distribution=data.distribution, count=data.documents,
                seed=train.seed,
            )  # fmt: skip
            self.batches = GlobalBatches(self.source, tokens_per_step=data.tokens_per_step,
                                         max_seq_len=data.max_seq_len, seed=train.seed)  # fmt: skip
        except DataError as error:
            raise RunError(str(error)) from None
        if data.tokens_per_rank < 1:
            raise RunError(f"data.tokens_per_rank must be positive, got {data.tokens_per_rank}")
        try:
            self.budget = parse_bytes(par.memory_budget, "--memory-budget") if par.memory_budget \
                else None  # fmt: skip
        except ValueError as error:
            raise RunError(str(error)) from None
        self.writer = self._metrics_writer()
        profile = self._profile()
        hardware = Hardware.from_dict(rank0_value(detect().to_dict(), mesh.device))
        self.budget_bytes = float(self.budget if self.budget is not None else hardware.memory_bytes)
        self.planner = self._planner(par.strategy, par.planner, profile, hardware)
        self.split_len = self._split_length(profile, hardware)
        self._check_fullest_micro_batch()
        if self.split_len < data.max_seq_len and mesh.rank == 0:  # said once the run can go ahead
            self.warn(
                f"warning: the longest sequence that fits {format_bytes(self.budget_bytes)} per "
                f"rank is {self.split_len} tokens: documents are split at {self.split_len}, not "
                f"at data.max_seq_len={data.max_seq_len}"
            )
        self.model = DecoderModel(config.model, mesh.sp_group, seed=train.seed,
                                  dtype=self.dtype, device=mesh.device)  # fmt: skip
        self.engine = Engine(
            self.model, mesh, self.planner, config.optim, total_steps=train.steps,
            hooks=hooks, optimizer_wrapper=optimizer_wrapper,
            measure_memory=train.measure_memory,
        )  # fmt: skip
        self.records: list[dict] = []
        self.split_documents = 0
        self.checkpointer = Checkpointer(self) if (train.save or train.resume) else None
        if resume_from is not None:
            try:
                step = self.checkpointer.load(resume_from)
            except CheckpointError as error:
                raise RunError(str(error)) from None
            if mesh.rank == 0:
                self.log(f"resumed from {resume_from} at step {step}")
        elif train.resume and mesh.rank == 0:
            self.log(f"no checkpoint in {train.resume} yet: starting from step 0")

    # ------------------------------------------------------------------ set-up
    def _checkpoint_to_resume(self) -> Path | None:
        """The verified checkpoint --resume names, or None (no --resume, or the first start of
        a self-resuming job); RunError, one line, if it is unusable."""
        train = self.config.train
        if not train.resume or self._first_start():
            return None
        try:
            return checked_checkpoint(train.resume, asdict(self.config.model), self.mesh)
        except CheckpointError as error:
            raise RunError(str(error)) from None

    def _first_start(self) -> bool:
        """--resume DIR with --save DIR and nothing saved there yet (rank 0 looks): the first
        start of a job that resumes itself after failures (torchrun --max-restarts)."""
        train = self.config.train
        if not train.save or Path(train.resume) != Path(train.save):
            return False
        empty = None
        if self.mesh.rank == 0:
            root = Path(train.resume)
            empty = not (root / "latest").is_file() and not (root / MANIFEST).is_file()
        return bool(rank0_value(empty, self.mesh.device))

    def _metrics_writer(self) -> MetricsWriter:
        """Rank 0 opens train.metrics now, so a bad path fails before any work (on every rank)."""
        path, error, writer = self.config.train.metrics, None, MetricsWriter(None)
        if path and self.mesh.rank == 0:
            try:
                writer = MetricsWriter(path, append=bool(self.config.train.resume))
            except OSError as e:
                error = f"cannot write the metrics file {path!r} ({e.strerror or e}): set --metrics"
        error = rank0_value(error, self.mesh.device)
        if error:
            raise RunError(error)
        return writer

    def _profile(self) -> Profile | None:
        """The cost-model profile named by parallel.profile (see `resolve_profile`)."""
        max_tokens = max(64, min(8192, self.config.data.max_seq_len))
        try:
            return resolve_profile(self.config.parallel.profile, self.mesh, self.config.model.shape,
                                   self.dtype, max_tokens=max_tokens, log=self.log,
                                   warn=self.warn)  # fmt: skip
        except ValueError as error:
            raise RunError(str(error)) from None

    def _planner(self, strategy: str, method: str, profile, hardware) -> Planner:
        par = self.config.parallel
        try:
            return build_planner(
                self.config.model, sp=self.mesh.sp, dp=self.mesh.dp, strategy=strategy,
                planner=method, recompute=par.recompute or None, budget_bytes=self.budget_bytes,
                dtype=self.config.train.dtype, shard_optimizer=self.config.optim.shard_optimizer,
                profile=profile, hardware=hardware,
            )  # fmt: skip
        except ValueError as error:
            raise RunError(str(error)) from None

    def _split_length(self, profile, hardware) -> int:
        """The cut length of long documents: data.max_seq_len, or less if the exact planner fits
        no sequence that long in the budget."""
        limit = self.config.data.max_seq_len
        exact = self.planner
        if self.planner.method != "exact":
            exact = self._planner(ADAPTIVE, "exact", profile, hardware)
        if exact.fits([limit]):
            return limit
        longest = exact.longest_fitting(limit)
        if longest < 2:
            try:
                exact.plan([2 * self.mesh.sp])
            except InfeasibleError as error:
                raise RunError(f"--memory-budget is impossible: {error}", EXIT_MEMORY) from None
            raise RunError("no sequence fits the memory budget", EXIT_MEMORY)
        return longest

    def fullest_micro_batch(self) -> list[int]:
        """The micro-batch of the most tokens (of the longest pieces) micro-batching can form."""
        sp, budget = self.mesh.sp, self.config.data.tokens_per_rank * self.mesh.sp
        piece = pad_length(self.split_len, sp)
        if piece >= budget:
            return [self.split_len]
        lens = [self.split_len] * (budget // piece)
        rest = budget - piece * len(lens)
        if rest >= 2 * sp:
            lens.append(rest)
        return lens

    def _check_fullest_micro_batch(self) -> None:
        lens = self.fullest_micro_batch()
        if self.planner.fits(lens):
            return
        par, data = self.config.parallel, self.config.data
        try:
            self.planner.plan(lens)
        except InfeasibleError as error:
            static = par.strategy != ADAPTIVE
            what = f"--strategy {par.strategy}" if static else "the adaptive planner"
            fixes = "--strategy adaptive, " if static else ""
            raise RunError(
                f"{what} cannot fit a full micro-batch of {sum(lens)} tokens "
                f"(data.tokens_per_rank={data.tokens_per_rank}, sp={self.mesh.sp}): {error}; "
                f"use {fixes}a larger --memory-budget or a smaller data.tokens_per_rank",
                EXIT_MEMORY,
            ) from None

    # ------------------------------------------------------------------ the loop
    def dp_cost(self, length: int) -> float:
        """Predicted seconds of one sequence alone under its fastest option per layer: what the
        data-parallel groups are balanced by."""
        tables = self.planner.costs.tables([length])
        return float(tables.time.min(axis=1).sum())

    def next_step(self) -> tuple[list, list[int], int]:
        """This dp group's micro-batches of the next global batch, its lengths, documents split."""
        batch = self.batches.next_batch(self.split_len)
        lens = batch.lengths
        mesh, data = self.mesh, self.config.data
        mine = assign_to_dp(lens, mesh.dp, self.dp_cost)[mesh.dp_rank]
        groups = micro_batches(lens, mine, tokens_per_rank=data.tokens_per_rank, sp=mesh.sp)
        return [[batch.sequences[i] for i in g] for g in groups], lens, batch.split

    def train_step(self) -> dict:
        try:
            sequences, lens, split = self.next_step()
        except DataError as error:
            raise RunError(f"step {self.engine.step_index}: {error}") from None
        loss_tokens = sum(n - 1 for n in lens)
        try:
            result: StepResult = self.engine.step(sequences, loss_tokens)
        except InfeasibleError as error:
            raise RunError(f"step {self.engine.step_index}: {error}", EXIT_MEMORY) from None
        if split:
            self.split_documents += split
        record = step_record(result, lens, split, self.budget_bytes)
        self.records.append(record)
        return record

    def run(self, steps: int | None = None) -> list[dict]:
        """Train `steps` (default train.steps) steps; rank 0 writes metrics and progress, and
        logs the summary."""
        train = self.config.train
        steps = train.steps - self.engine.step_index if steps is None else steps
        rank0 = self.mesh.rank == 0
        writer = self.writer
        progress = Progress(self.engine.step_index + steps, enabled=train.progress and rank0)
        warned = False
        try:
            for i in range(steps):
                record = self.train_step()
                writer.write(record)
                progress.update(record)
                every = train.save_every
                if train.save and ((every and self.engine.step_index % every == 0)
                                   or i == steps - 1):  # fmt: skip
                    saved = self.checkpointer.save(train.save)
                    if rank0:
                        self.log(f"saved {saved}")
                if record["split"] and rank0 and not warned:
                    self.warn(
                        f"warning: documents longer than {self.split_len} tokens are split "
                        f"into pieces of at most {self.split_len} (counted per step in the "
                        "metrics' split field)"
                    )
                    warned = True
        finally:
            writer.close()
        if rank0:
            for line in self.summary():
                self.log(line)
        return self.records

    def summary(self) -> list[str]:
        lines = summary_lines(self.records, self.budget_bytes)
        if self.split_documents:
            lines.append(f"{self.split_documents} documents were split at {self.split_len} tokens")
        return lines

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
