"""The training run behind `paradyse-train`: set up from a Config, check feasibility, loop.

Set-up, in order (each failure is one line and an exit code, raised as `RunError`): the mesh
and the model's fit to sp -> the checkpoint to resume from (checked before anything slow) -> the
data -> the metrics file -> the cost-model profile and the hardware -> the planner -> the cut
length (the longest sequence the exact planner fits in the budget: longer documents are split
there, whatever the strategy, so every strategy trains on the same data) -> the fullest
micro-batch must fit the chosen strategy -> the model -> the integrations -> the engine -> the
checkpointer, and the resume.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from cost_models import Hardware, Profile, detect
from parallel_lib import Mesh, init_mesh, pad_length, rank0_value
from planners import InfeasibleError, Planner, PlanningSetup, format_bytes

from .checkpoint import Checkpointer, CheckpointError, checked_checkpoint, first_start
from .checkpoint_state import ModelState, OptimizerState, TrainProgress, device_mesh_of
from .config import Config
from .data import DataError, GlobalBatches, assign_to_dp, micro_batches, run_stream
from .engine import Engine, LayerHooks, OptimizerWrapper, StepResult
from .init import InitError, build_model, model_source
from .integration import Integration, IntegrationError, RunContext, engine_parts, plug_in
from .metrics import MetricsWriter, Progress, step_record, summary_lines
from .model import DecoderModel
from .planning import ADAPTIVE, exact_setup, resolve_profile, run_method, run_setup

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
    """Builds everything a run needs from `config` (collective: every rank constructs it).

    `hooks` and `optimizer_wrapper` plug in beside the integrations the config turns on."""

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
        self.mesh = self._mesh(mesh)
        self.config, self.pretrained = self._model_source()
        self._check_split()
        resume_from = self._checkpoint_to_resume()  # checked before the slow set-up
        self.dtype = getattr(torch, config.train.dtype)
        self.batches = self._data()
        self.writer = self._metrics_writer()
        profile, hardware = self._profile(), self._hardware()
        self.setup = self._planning_setup(profile, hardware)
        self.budget_bytes = self.setup.budget
        self.planner = self._planner(self.setup)
        self.split_len = self._split_length()
        self._check_fullest_micro_batch()
        self._warn_about_the_cut()
        self.model = self._model(fills=resume_from is not None)
        self.integrations = self._plug_in_integrations()
        self.engine = self._engine(hooks, optimizer_wrapper)
        self.records: list[dict] = []
        self.split_documents = 0
        self.checkpointer = self._checkpointer()
        self._resume(resume_from)

    # ------------------------------------------------------------------ set-up
    def _model(self, fills: bool) -> DecoderModel:
        """The model, drawn or loaded (`paradyse.init.build_model`); `self.pretrained` freed."""
        source, self.pretrained = self.pretrained, None  # a GGUF source holds every tensor
        try:
            return build_model(self.config, self.mesh.sp_group, source, dtype=self.dtype,
                               device=self.mesh.device, fills=fills)  # fmt: skip
        except InitError as error:
            raise RunError(str(error)) from None

    def _mesh(self, mesh: Mesh | None) -> Mesh:
        """The given mesh, or one from the torchrun environment."""
        if mesh is None:
            try:
                mesh = init_mesh(self.config.parallel.sp or None)
            except ValueError as error:
                raise RunError(f"parallel.sp: {error}") from None
        return mesh

    def _model_source(self):
        """The config with the model's shape from `model.init` (`paradyse.init.model_source`)."""
        resuming = bool(self.config.train.resume) and not first_start(self.config.train, self.mesh)
        try:
            return model_source(self.config, self.mesh, resuming=resuming)
        except InitError as error:
            raise RunError(str(error)) from None

    def _check_split(self) -> None:
        problem = self.config.model.sp_problem(self.mesh.sp)
        if problem:
            raise RunError(f"the model cannot be split over sp={self.mesh.sp}: {problem}")

    def _data(self) -> GlobalBatches:
        """The data source and its stream of global batches."""
        data, train = self.config.data, self.config.train
        try:
            batches = run_stream(data, self.config.model.vocab, train.seed)
            self.source = batches.source
        except DataError as error:
            raise RunError(str(error)) from None
        if data.tokens_per_rank < 1:
            raise RunError(f"data.tokens_per_rank must be positive, got {data.tokens_per_rank}")
        return batches

    def _hardware(self) -> Hardware:
        """This machine as rank 0 sees it, so the ranks of an sp group plan alike."""
        return Hardware.from_dict(rank0_value(detect().to_dict(), self.mesh.device))

    def _describe(self) -> dict:
        """What a checkpoint of this run records and a resume must match."""
        integrations = {name: asdict(o) for name, o in self.config.integrations.items()}
        return {"model": asdict(self.config.model), "integrations": integrations}

    def _checkpoint_to_resume(self) -> Path | None:
        """The verified checkpoint --resume names, or None (no --resume, or the first start of
        a self-resuming job); RunError, one line, if it is unusable."""
        train = self.config.train
        if not train.resume or first_start(self.config.train, self.mesh):
            return None
        try:
            return checked_checkpoint(train.resume, self._describe(), self.mesh)
        except CheckpointError as error:
            raise RunError(str(error)) from None

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
                                   warn=self.warn,
                                   check=self.config.parallel.profile_check)  # fmt: skip
        except ValueError as error:
            raise RunError(str(error)) from None

    def _planning_setup(self, profile: Profile | None, hardware: Hardware) -> PlanningSetup:
        try:
            return run_setup(self.config, sp=self.mesh.sp, dp=self.mesh.dp, hardware=hardware,
                             profile=profile)  # fmt: skip
        except ValueError as error:
            raise RunError(str(error)) from None

    def _planner(self, setup: PlanningSetup) -> Planner:
        try:
            return setup.planner(run_method(self.config))
        except ValueError as error:
            raise RunError(str(error)) from None

    def _split_length(self) -> int:
        """The cut length of long documents: data.max_seq_len, or less if the exact planner fits
        no sequence that long in the budget."""
        limit = self.config.data.max_seq_len
        exact = self.planner
        if self.planner.method.kind != "exact":
            exact = exact_setup(self.setup).planner("exact")
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

    def _warn_about_the_cut(self) -> None:
        """Said once the run can go ahead: documents are cut shorter than data.max_seq_len."""
        limit = self.config.data.max_seq_len
        if self.split_len < limit and self.mesh.rank == 0:
            self.warn(
                f"warning: the longest sequence that fits {format_bytes(self.budget_bytes)} per "
                f"rank is {self.split_len} tokens: documents are split at {self.split_len}, not "
                f"at data.max_seq_len={limit}"
            )

    def _plug_in_integrations(self) -> dict[str, Integration]:
        """The integrations of [integrations.NAME], plugged into the built model."""
        train = self.config.train
        run = RunContext(self.mesh, self.model, len(self.model.switchable_layers()), train.steps,
                         train.seed)  # fmt: skip
        try:
            return plug_in(self.config.integrations, run)
        except (IntegrationError, ValueError) as error:
            raise RunError(str(error)) from None

    def _engine(self, hooks, optimizer_wrapper) -> Engine:
        """The engine, with the caller's and the integrations' hooks, optimizer wrapper (one at
        most: it alone decides which layers train) and router hook (one at most)."""
        config = self.config
        try:
            hooks, wrapper, router = engine_parts(self.integrations, hooks, optimizer_wrapper)
            return Engine(
                self.model, self.mesh, self.planner, config.optim, total_steps=config.train.steps,
                hooks=hooks, optimizer_wrapper=wrapper, router_hook=router,
                measure_memory=config.train.measure_memory,
            )  # fmt: skip
        except (IntegrationError, ValueError) as error:
            raise RunError(str(error)) from None

    def _checkpointer(self) -> Checkpointer | None:
        """The checkpointer over every stateful part, when the run saves or resumes."""
        train = self.config.train
        if not (train.save or train.resume):
            return None
        mesh, engine = self.mesh, self.engine
        whole = device_mesh_of(mesh)
        parts = {
            "model": ModelState(self.model, mesh, whole),
            "optim": OptimizerState(self.model, mesh, whole, engine.optimizers),
            "train": TrainProgress(engine),
            "data": self.batches,
        }
        for name, integration in self.integrations.items():
            if integration.state is not None:
                parts[f"integrations.{name}"] = integration.state
        return Checkpointer(mesh, parts, self._describe())

    def _resume(self, directory: Path | None) -> None:
        train = self.config.train
        if directory is not None:
            try:
                self.checkpointer.load(directory)
            except CheckpointError as error:
                raise RunError(str(error)) from None
            if self.mesh.rank == 0:
                self.log(f"resumed from {directory} at step {self.engine.step_index}")
        elif train.resume and self.mesh.rank == 0:
            self.log(f"no checkpoint in {train.resume} yet: starting from step 0")

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
        """This dp group's micro-batches of the next global batch, its lengths, documents split;
        `self.batch` keeps the global batch (its `targets` normalise the step's loss)."""
        batch = self.batch = self.batches.next_batch(self.split_len)
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
        loss_tokens = self.batch.targets  # n - 1 a sequence, less its masked targets
        if loss_tokens < 1:
            raise RunError(
                f"step {self.engine.step_index}: no token of the batch carries loss (every "
                "target is masked): raise data.max_seq_len or data.tokens_per_step"
            )
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
                    saved = self.checkpointer.save(train.save, self.engine.step_index)
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
