"""The one run skeleton of every training command: pretrain, finetune, linear (and the dense probes).

A training command is a *recipe*: its config, its state (what goes into the checkpoint), its step or
its epoch, its evaluation. It runs inside a :class:`TrainingRun`, which owns what every run folder
promises, so that ``--resume``, ``--stop-after`` and ``--overwrite`` mean one thing everywhere
(docs/guarantees.md):

- the folder: a fresh run is refused in a folder that holds results unless ``--overwrite``, which
  removes exactly the files of the command's earlier run; ``--resume`` needs the command's own
  checkpoint there; the folder's lock is held for the whole run (rank 0 under torchrun);
- the resume policy: the saved checkpoint is read and checked once; the config of a resumed run is
  the saved one with this command line's run control on top, and a changed recipe is refused in one
  sentence naming each change (:meth:`TrainingRun.resumed_config`); the run identity (recipe and
  data) of the checkpoint must be the run's (:meth:`TrainingRun.check_identity`);
- the thread plan: chosen once (``--threads``, else the cores free when the run starts), recorded in
  ``config.json`` and every checkpoint, and reused by ``--resume``, so that a run's numbers never
  depend on the machine's load when it was resumed (:meth:`TrainingRun.plan_threads`);
- stopping: SIGINT/SIGTERM become a flag agreed across ranks (:meth:`TrainingRun.poll`), and
  ``--stop-after N`` ends the invocation when N units of the schedule are done, counted from the
  run's start (:meth:`TrainingRun.end`); a loop counts in epochs or in iterations (``RunKind.unit``);
- checkpoints: written atomically with signals held until they are complete, at the ends of the
  recipe's units and every ``--checkpoint-minutes`` (:attr:`TrainingRun.cadence`);
- the finish: the outcome (finished, stopped by what, exit code 128 + signal) and ``metrics.json``
  with the run's record (:meth:`TrainingRun.outcome`, :meth:`TrainingRun.write_metrics`).

The skeleton lives beside io and runtime (not in train/) because evaluation's probes use it too and
eval never imports train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import read_checkpoint, save_checkpoint
from .errors import CheckpointError, DinokitError
from .io import (
    check_run_identity,
    check_training_folder,
    merge_resume_config,
    prepare_output_dir,
    refuse_earlier_run,
    release_run_folder,
    remove_run_files,
    signals_deferred,
    write_json,
    write_metrics,
)
from .runtime import (
    CpuPlan,
    DistEnv,
    GracefulStop,
    barrier,
    cleanup_distributed,
    cpu_threads,
    init_distributed,
    max_over_ranks,
    plan_cpu,
    signal_exit_code,
)

log = logging.getLogger("dinokit")

UNITS = ("epoch", "iteration")


@dataclass(kw_only=True)
class RunOptions:
    """How a training run is driven: the options every training command shares, with one meaning.

    Configs inherit these fields (one definition, flat in ``metrics.json``)."""

    #: continue the run in the output folder from its checkpoint (refused where there is none)
    resume: bool = False
    #: start a new run in a folder holding an earlier one, removing exactly that run's files first
    overwrite: bool = False
    #: end this invocation cleanly when N units (epochs or iterations) of the schedule are done,
    #: counted from the run's start; resumable
    stop_after: int | None = None
    #: also write the checkpoint every this many minutes within a unit (0: only at the ends of units)
    checkpoint_minutes: float = 10.0
    #: CPU compute threads (None: the cores other programs leave free when the run starts); a resumed
    #: run keeps the plan it was started with
    threads: int | None = None


#: the RunOptions fields: this invocation's, never the run's recipe
RUN_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))


@dataclass(frozen=True)
class RunKind:
    """What the skeleton needs to know of a recipe's run folder."""

    command: str  #: the CLI command (for the sentences and the resume hint)
    noun: str  #: "pretraining run", "fine-tuning run", ...
    files: tuple[str, ...]  #: the files (or glob patterns) its runs write: what --overwrite removes
    formats: tuple[str, ...] = ()  #: the ``format`` values of its checkpoints
    keys: tuple[str, ...] = ()  #: or, for checkpoints without a format, the keys they must hold
    unit: str = "epoch"  #: what --stop-after and the outcome count: "epoch" or "iteration"
    checkpoint: str = "checkpoint.pth"
    #: config fields always taken from this command line on --resume, typed or not (besides output,
    #: resume, overwrite and stop_after)
    per_invocation: frozenset[str] = frozenset()
    #: config fields a resumed run takes from this command line when typed (else the saved value)
    may_change: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, not {self.unit!r}")

    def resume_hint(self, output: str | os.PathLike) -> str:
        return f"dinokit {self.command} --output {output} --resume"

    def accepts(self, ckpt: Any) -> bool:
        if not isinstance(ckpt, dict):
            return False
        if "format" in ckpt:
            return ckpt["format"] in self.formats
        return bool(self.keys) and all(k in ckpt for k in self.keys)


@dataclass(frozen=True)
class RunOutcome:
    """How an invocation of a run ended."""

    done: int  #: units of the schedule done (epochs or iterations)
    total: int  #: units of the schedule
    unit: str
    signum: int = 0  #: the signal that stopped it (0: none)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def stopped_by(self) -> str | None:
        if self.signum:
            return signal.Signals(self.signum).name
        return None if self.finished else "stop-after"

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped the run (130 for Ctrl-C, 143 for SIGTERM), else 0."""
        return signal_exit_code(self.signum)

    def record(self) -> dict[str, Any]:
        return {"finished": self.finished, f"{self.unit}s_done": self.done, f"{self.unit}s": self.total,
                "stopped_by": self.stopped_by}  # fmt: skip


class TrainingRun:
    """One invocation of a training run in its folder; use as a context manager around the recipe.

    Entering sets up the process group (torchrun), opens the folder (fresh, ``--overwrite`` or
    ``--resume``, see the module's text) with its lock, reads the checkpoint to resume and installs
    the graceful stop; leaving restores the threads and the signal handlers, releases the folder and
    the process group. A data-loader worker that died becomes one sentence with the resume hint.
    """

    def __init__(self, kind: RunKind, output: str | os.PathLike, options: RunOptions, device: torch.device):
        self.kind = kind
        self.out = Path(output)
        self.options = options
        self.device = device
        self.env: DistEnv = DistEnv()
        self.checkpoint: dict | None = None  #: the checkpoint being resumed (None: a fresh run)
        self.saved_config: dict | None = (
            None  #: the resumed run's config (config.json, else the checkpoint's)
        )
        self.plan: CpuPlan | None = None
        self.identity: dict | None = None
        self.stop = GracefulStop()
        self.cadence = CheckpointCadence(options.checkpoint_minutes)
        self._stack = contextlib.ExitStack()

    # -- entering and leaving ------------------------------------------------------------------
    def __enter__(self) -> TrainingRun:
        try:
            self._stack.callback(cleanup_distributed)
            self.env = init_distributed(self.device)
            self._open()
            self._stack.enter_context(self.stop)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stack.close()
        if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
            raise DinokitError(
                f"A data-loading worker died ({str(exc).strip().splitlines()[0]}); {self.out / self.kind.checkpoint} "
                f"keeps the last saved state: continue with --resume (with --num-workers 0 if it happens again)."
            ) from exc

    def _open(self) -> None:
        opts, kind, out = self.options, self.kind, self.out
        check_training_folder(out, kind.checkpoint, kind.noun, resume=opts.resume, overwrite=opts.overwrite,
                              main=self.env.is_main)  # fmt: skip
        ckpt_path = out / kind.checkpoint
        if self.env.is_main:
            if opts.resume:
                prepare_output_dir(out, resume=True)
            else:
                prepare_output_dir(out, overwrite=opts.overwrite)
            self._stack.callback(release_run_folder, out)
            if not opts.resume:  # again, now that no other process writes there
                refuse_earlier_run(out, kind.checkpoint, kind.noun, opts.overwrite)
                remove_run_files(
                    out, kind.files
                )  # --overwrite: nothing of an earlier run passes for this one's
        barrier()
        if opts.resume:
            self.checkpoint = self._read_checkpoint(ckpt_path)
            self.saved_config = self._read_saved_config()

    def _read_checkpoint(self, path: Path) -> dict:
        ckpt = read_checkpoint(path)
        if not self.kind.accepts(ckpt):
            raise CheckpointError(f"{path} is not a checkpoint of a dinokit {self.kind.noun}.")
        return ckpt

    def _read_saved_config(self) -> dict | None:
        """The run's config: its config.json (the record a person reads and may have been changed
        into another run's), else the checkpoint's."""
        try:
            saved = json.loads((self.out / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            ckpt_config = self.checkpoint.get("config") if self.checkpoint is not None else None
            saved = ckpt_config if isinstance(ckpt_config, dict) else None
        return saved

    # -- the resume policy ----------------------------------------------------------------------
    def resumed_config(
        self, given: dict[str, Any], explicit: set[str] | None, fields: Iterable[str]
    ) -> dict[str, Any]:
        """The settings of this invocation: ``given`` for a fresh run; for a resumed one the saved
        config with this command line on top (``kind.per_invocation`` always from it, the
        ``RunOptions`` and ``kind.may_change`` when typed); a typed option of the recipe that differs
        from the saved one is refused, naming each. ``explicit`` names the options typed (None: every
        field of ``given`` that is not None counts as asked for, as a library caller means it)."""
        if self.checkpoint is None or self.saved_config is None:
            return dict(given)
        always = set(self.kind.per_invocation) | {"output", "resume", "overwrite", "stop_after"}
        return merge_resume_config(
            self.saved_config, given, explicit=explicit, always=always,
            run_control=set(self.kind.may_change) | {"threads", "checkpoint_minutes"}, keep_recipe=True,
            fields=list(fields),
            where=f"the {self.kind.noun} in {self.out}",
        )  # fmt: skip

    def check_identity(self, identity: dict[str, Any], saved: dict[str, Any] | None = None) -> None:
        """Record this run's identity (what makes it this run: recipe, data) for its checkpoints, and on
        --resume refuse a checkpoint whose identity (``saved`` where the checkpoint has none) differs."""
        self.identity = identity
        if self.checkpoint is None:
            return
        recorded = self.checkpoint.get("run_identity") or self.checkpoint.get("identity") or saved
        check_run_identity(self.out / self.kind.checkpoint, recorded, identity,
                           what="the run asked for (its config.json and this command line)")  # fmt: skip

    # -- the thread plan ------------------------------------------------------------------------
    def plan_threads(self, threads: int | None, workers: int) -> CpuPlan:
        """The CPU threads and loader workers of this run, and torch set to those threads until the run
        ends. A fresh run plans from ``threads`` (``--threads``) or the cores free now; a resumed run
        reuses the threads it was started with, so that its numbers are bitwise the uninterrupted
        run's, unless ``--threads`` asks anew for another count (then the last bits may differ)."""
        recorded = (self.checkpoint or {}).get("cpu_plan") or {}
        saved_threads = recorded.get("threads")
        asked_anew = threads is not None and threads != (self.saved_config or {}).get("threads")
        if saved_threads and not asked_anew:
            plan = plan_cpu(int(saved_threads), workers, self.device)
            plan = dataclasses.replace(plan, chosen_by="the run's plan")
        else:
            plan = plan_cpu(threads, workers, self.device)
            if saved_threads and int(saved_threads) != plan.threads:
                log.warning(
                    "the run computed on %d thread(s) so far and goes on with %d (--threads): its numbers "
                    "may differ from an uninterrupted run's in the last bits",
                    int(saved_threads),
                    plan.threads,
                )
        self.plan = plan
        self._stack.enter_context(cpu_threads(plan.threads))
        log.info("%s: %s", self.device, plan.describe())
        return plan

    # -- stopping and checkpoints ---------------------------------------------------------------
    def end(self, total: int) -> int:
        """Where this invocation stops: the end of the schedule (``total`` units), or ``--stop-after N``
        units of it counted from the run's start (a run resumed at or past N does nothing more)."""
        stop_after = self.options.stop_after
        return total if stop_after is None else min(total, int(stop_after))

    def poll(self, *flags: float) -> tuple[int, bool, list[float]]:
        """One collective between steps: the signal any rank got (0: none), whether the checkpoint
        cadence is due on any rank, and the maximum over ranks of each of ``flags`` (a non-finite
        loss, ...). Every rank must call it at the same steps."""
        values = max_over_ranks([self.stop.signum or 0, self.cadence.due(), *flags], self.device)
        return int(values[0]), bool(values[1]), values[2:]

    def agreed_signal(self) -> int:
        """The signal any rank got (0 for none), the same on every rank."""
        return self.poll()[0]

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Around writing a checkpoint: Ctrl-C and SIGTERM wait until it is complete (they take effect
        right after), and the time cadence starts again."""
        with signals_deferred():
            yield
        self.cadence.saved()

    def record(self) -> dict[str, Any]:
        """What every checkpoint and config.json of the run carries: its identity and its thread plan."""
        out: dict[str, Any] = {"cpu_plan": dataclasses.asdict(self.plan) if self.plan else None}
        if self.identity is not None:
            out["run_identity"] = self.identity
        return out

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        """``state`` with the run's record into the checkpoint, atomically, on rank 0 (call it inside
        :meth:`saving`)."""
        if self.env.is_main:
            save_checkpoint({**state, **self.record()}, self.out / self.kind.checkpoint)

    def write_config(self, config: dict[str, Any]) -> None:
        """``config.json``: the run's settings and its record, on rank 0."""
        if self.env.is_main:
            write_json(self.out / "config.json", {**config, **self.record()})

    # -- the finish -----------------------------------------------------------------------------
    def outcome(self, done: int, total: int, signum: int = 0) -> RunOutcome:
        return RunOutcome(int(done), int(total), self.kind.unit, int(signum or 0))

    def write_metrics(
        self,
        outcome: RunOutcome,
        metrics: dict[str, Any],
        config: dict[str, Any] | None = None,
        units: dict[str, str] | None = None,
    ) -> Path | None:
        """``metrics.json`` with the outcome and the thread plan ahead of the recipe's ``metrics``, on rank 0."""
        if not self.env.is_main:
            return None
        record = {
            **outcome.record(),
            **metrics,
            "cpu_plan": dataclasses.asdict(self.plan) if self.plan else None,
        }
        return write_metrics(self.out, record, config=config, units=units)


class CheckpointCadence:
    """When a run writes a checkpoint in the middle of a unit: every ``minutes`` of training (0: only at
    the ends of units), so that a run killed without warning (SIGKILL, a lost machine) loses at most
    that much. The checkpoint is the one a signal writes (the step it stopped at, the RNG states and
    the unit's tally), so the resumed run continues exactly as the uninterrupted one."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * float(minutes)
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        """A checkpoint was just written (at the cadence, at a unit's end, or for a signal)."""
        self.last = time.monotonic()


__all__ = ["RUN_OPTION_FIELDS", "CheckpointCadence", "RunKind", "RunOptions", "RunOutcome", "TrainingRun"]
