"""The training loop: iterations, AdamW + poly, accumulation, clipping, AMP, DDP, validation,
checkpoints and exact resume.

    trainer = Trainer(cfg)                      # or Trainer(cfg, resume=True) / resume="path"
    final_model = trainer.train()               # RUN/model_final.safetensors

Under ``torchrun`` every process runs the same code; rank 0 logs and writes files, metrics are
reduced over processes. ``cfg.train.batch_size`` is per process (and micro-batch).

Tuning methods get the trainer in ``method.on_train_iteration(iteration, trainer)`` before every
iteration (also the first one after a resume) and may use:

* ``trainer.model``: the unwrapped Segmentor (forward/backward through it is not synchronised by DDP;
  ``train.grad_checkpointing`` is off during ``on_train_iteration``, see :mod:`dgss.engine.speed`);
* ``trainer.next_batch()``: the next source batch of this process, on ``trainer.device`` (it counts
  as consumed data, so a resumed run sees the same batches);
* ``trainer.cfg``, ``trainer.total_iters``, ``trainer.iteration``, ``trainer.device``,
  ``trainer.rank``, ``trainer.world_size``, ``trainer.num_train_images`` (all sources);
* ``trainer.rebuild_optimizer()``: call it (on every process) after changing which tensors train;
  tensors that keep training keep their AdamW moments, and DDP is re-wrapped.
* ``trainer.optimizer``: its groups' options other than ``lr`` may be scheduled here (SoMA anneals
  ``weight_decay``); the engine sets ``lr`` itself after the hook.

A method whose decisions change the trainable set must keep them in its state dict: the model file
of a checkpoint restores them, and the optimizer state is matched to parameters by name. Optional:
``method.ddp_buffers_to_ignore()`` names (relative to the method) of buffers DDP need not broadcast.

On a cluster (:mod:`dgss.engine.preemption`): SIGTERM or SIGUSR1 makes every process finish its step,
the run checkpoints that iteration and raises :class:`~dgss.engine.preemption.TrainingPreempted` (exit
code 75). A resume takes the newest intact checkpoint, passing over damaged ones with a log line, and
``resume="auto"`` starts the run when there is no checkpoint yet (a requeued or restarted job repeats
its command). A checkpoint that does not fit on the disk stops the run with one line
(:class:`~dgss.engine.checkpoint.DiskFullError`); samples a dataset skips are counted and reported.

Weight EMA (``train.ema.enabled``, :mod:`dgss.engine.ema`): after every iteration the average of every
tensor the optimizer trains is updated; validation runs on the averages, ``model_final.safetensors``
holds them and ``model_final_raw.safetensors`` the raw weights. A checkpoint's model file holds the raw
weights (what a resume continues from) and its state file the averages, so a resume stays exact.
"""

from __future__ import annotations

import contextlib
import random
import signal
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import NON_EXPERIMENT_KEYS, ExperimentConfig, config_differences, save_config, to_dict
from ..data import build_train_loader
from ..fileio import remove_stale_temp_files
from ..precision import apply_tf32, describe_precision
from ..tuning.model import build_segmentor
from . import checkpoint as ckpt
from . import fsdp
from .config_check import check_config
from .data_stream import ResumableBatches
from .distributed import DistContext, all_reduce_sum, barrier, broadcast_object, init_distributed
from .ema import WeightEMA
from .evaluate import autocast_context, evaluate_datasets
from .logging import TrainLogger
from .optim import build_optimizer, load_optimizer_state_by_name, optimizer_state_by_name
from .preemption import PREEMPTED_EXIT_CODE, PreemptionWatch, TrainingPreempted
from .schedule import PolySchedule
from .speed import apply_speed_options, checkpointing_where_needed, compile_errors, without_checkpointing

__all__ = ["Trainer", "NonFiniteLossError", "DivergedWeightsError", "RunFolderInUseError", "seed_everything",
           "FINAL_MODEL_NAME", "FINAL_RAW_MODEL_NAME"]

FINAL_MODEL_NAME = "model_final.safetensors"
FINAL_RAW_MODEL_NAME = "model_final_raw.safetensors"  # with train.ema: the raw weights beside the EMA ones


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (``train.nan_policy: stop``, or more than
    ``train.max_consecutive_skips`` times in a row under ``skip``)."""


class DivergedWeightsError(NonFiniteLossError):
    """The weights diverged (NaN/inf, or beyond :data:`dgss.engine.checkpoint.DIVERGED_WEIGHT`) when a
    checkpoint or the final model was due; nothing was written. A NonFiniteLossError: the run diverged."""


class RunFolderInUseError(ckpt.CheckpointError):
    """A new (not resumed) run was started in a folder that holds another run's training outputs."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _earlier_run_outputs(run_dir: Path) -> list[str]:
    """What an earlier training left in ``run_dir``: its final model, checkpoints or metrics log."""
    found = []
    if (run_dir / FINAL_MODEL_NAME).exists():
        found.append(FINAL_MODEL_NAME)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    if (run_dir / "logs" / "metrics.jsonl").exists():
        found.append("logs/metrics.jsonl")
    return found


def refuse_earlier_run(run_dir: Path) -> None:
    """A new run must not mix with an earlier one in its folder (checkpoints pruned across runs, a
    ``last`` pointer of the other run, one metrics log for both): refuse, naming the ways out."""
    found = _earlier_run_outputs(run_dir)
    if not found:
        return
    resumable = (run_dir / "checkpoints" / ckpt.POINTER_NAME).is_file()
    way_out = ("continue it with --resume (Trainer(cfg, resume=True)), or start this one in another folder"
               if resumable else "it has no checkpoint to resume from: start this one in another folder")
    raise RunFolderInUseError(f"run folder {run_dir} already holds a training run ({', '.join(found)}); {way_out} "
                              "(name=... or output_dir=...), or delete that folder first")


class Trainer:
    """One training run of ``cfg`` (see the module docstring).

    Args:
        cfg: the resolved experiment config; outputs go to ``cfg.run_dir``.
        resume: None/False for a new run (refused with :class:`RunFolderInUseError` when ``cfg.run_dir``
            holds another run's final model, checkpoints or log), True for the newest intact checkpoint
            in ``RUN/checkpoints``, "auto" for the same or, when there is none, a new run (refused only
            when the folder holds a final model), or a checkpoint file (either file of the pair) or folder.
        ctx: the process context; default: from torchrun's environment (``init_distributed``).
    """

    def __init__(self, cfg: ExperimentConfig, *, resume: Union[None, bool, str, Path] = None,
                 ctx: Optional[DistContext] = None) -> None:
        train = cfg.train
        check_config(cfg)  # the names and values `dgss config` checks, before anything is built
        self._resume_notes: list[str] = []  # what the log says about where the run starts
        fsdp_run = train.parallel == "fsdp"  # (its checkpoints are dgss.engine.fsdp's)
        if resume == "auto" and not (fsdp.has_checkpoint(cfg.run_dir / "checkpoints") if fsdp_run
                                     else ckpt.checkpoint_candidates(cfg.run_dir / "checkpoints")):
            if (cfg.run_dir / FINAL_MODEL_NAME).exists():
                raise RunFolderInUseError(f"run folder {cfg.run_dir} holds a finished run ({FINAL_MODEL_NAME}) and no "
                                          "checkpoint to continue from; start this one in another folder")
            resume = None
            self._resume_notes.append(f"no checkpoint in {cfg.run_dir / 'checkpoints'} yet: starting at iteration 0")
        elif not resume:  # before any expensive work: whether a new run may start in this folder
            refuse_earlier_run(cfg.run_dir)
        self.cfg = cfg
        self.ctx = ctx if ctx is not None else init_distributed(train.device)
        self.device, self.rank, self.world_size = self.ctx.device, self.ctx.rank, self.ctx.world_size
        self.fsdp = fsdp_run and self.ctx.distributed  # train.parallel=fsdp on one process is plain training
        if self.fsdp:
            fsdp.check_supported(cfg)
        self.total_iters = train.iters
        self.iteration = 0
        self.run_dir = cfg.run_dir
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.schedule = PolySchedule.from_config(train)
        self.amp = train.amp if self.device.type == "cuda" else "none"
        if train.amp != "none" and self.amp == "none":
            warnings.warn(f"train.amp={train.amp} applies on a GPU only; training in fp32 on the CPU", stacklevel=2)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        apply_tf32(train.tf32, self.device)  # training, its evaluations and a method's own passes
        self.last_checkpoint: Optional[Path] = None
        self.preemption = PreemptionWatch()  # records SIGTERM/SIGUSR1 while train() runs
        # nan_policy skip: optimizer steps skipped in the whole run, and in a row now (both resume)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.skipped_samples = 0  # unreadable samples skipped in the whole run (known at its end)

        seed_everything(train.seed)  # identical initial weights on every process
        self.model = build_segmentor(cfg).to(self.device)
        self.model.train()
        self._fingerprint = None if ckpt.stores_backbone(self.model, cfg) else ckpt.backbone_identity(self.model.backbone)
        seed_everything(train.seed + self.rank)  # per-process randomness (e.g. Mask2Former's point sampling)

        state, data_position = None, 0
        if resume and self.fsdp:  # the training state now, the shards once the model is sharded
            fsdp_folder, state_path = fsdp.latest_checkpoint(self.checkpoint_dir if resume in (True, "auto") else resume)
            state = fsdp.read_training_state(state_path)
            self.iteration, data_position = int(state["iteration"]), int(state["data_position"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.consecutive_skips = int(state.get("consecutive_skips", 0))
            self.last_checkpoint = fsdp_folder
        elif resume:
            loaded = self._open_checkpoint(resume)
            model_path, state_path, state = loaded.model_path, loaded.state_path, loaded.state
            meta = ckpt.load_model_weights(self.model, model_path, contents=(loaded.tensors, loaded.meta))
            diverged = ckpt.diverged_tensors(self.model)  # e.g. written before dgss checked weights
            if diverged:
                raise ckpt.CheckpointError(f"{model_path} holds diverged weights ({', '.join(diverged[:5])}: NaN, inf "
                                           "or beyond 1.8e19): resume from an earlier checkpoint")
            self._warn_config_changes(meta.get("config", {}), model_path)
            self.iteration, data_position = int(state["iteration"]), int(state["data_position"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.consecutive_skips = int(state.get("consecutive_skips", 0))
            del loaded  # the file's tensors are in the model now
            if state.get("world_size", 1) != self.world_size or state.get("batch_size") != train.batch_size:
                warnings.warn(f"{model_path} was written with {state.get('world_size')} process(es) of batch "
                              f"{state.get('batch_size')}; resuming with {self.world_size} of {train.batch_size} "
                              "continues, but not exactly as the original run would have", stacklevel=2)
            self.last_checkpoint = model_path

        # checkpointing and torch.compile (in place: names unchanged) before the optimizer and DDP
        apply_speed_options(self.model, train)
        if self.fsdp:  # before the optimizer: it holds the shards
            fsdp.shard_segmentor(self.model)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.ddp_model: Optional[DistributedDataParallel] = None
        self._pending_optimizer_state: dict = {}
        self.ema: Optional[WeightEMA] = WeightEMA.from_config(train.ema) if train.ema.enabled else None
        self.rebuild_optimizer()
        if state is not None:
            self._pending_optimizer_state = load_optimizer_state_by_name(
                self.optimizer, self.model, state["optimizer"], device=self.device)
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self._restore_ema(state, state_path)
            if self.fsdp:
                fsdp.load_sharded(fsdp_folder, self.model, self.optimizer)
        loader = build_train_loader(cfg, rank=self.rank, world_size=self.world_size)
        self.num_train_images = sum(len(d) for d in loader.datasets)  # all sources
        self.batches = ResumableBatches(loader, seed=train.seed, rank=self.rank, world_size=self.world_size,
                                        start=data_position)
        if state is not None:  # samples skipped before the checkpoint, per process
            skipped = state.get("skipped_samples", [])
            if len(skipped) == self.world_size:
                self.batches.skipped.update(skipped[self.rank])
            elif self.rank == 0:
                for counts in skipped:
                    self.batches.skipped.update(counts)
        if state is not None:  # last: nothing after this may draw random numbers before training
            rng = state["rng"]
            ckpt.restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])

    def _open_checkpoint(self, resume: Union[bool, str, Path]) -> ckpt.LoadedCheckpoint:
        """The checkpoint to resume from, read and checked. A folder (True, "auto": RUN/checkpoints) gives
        its newest intact checkpoint, damaged ones passed over and named in the log; rank 0 chooses and
        every process reads that one. A file is used as given, and refused when damaged."""
        spec = None if resume is True or resume == "auto" else Path(resume)
        if spec is not None and not spec.is_dir():
            return ckpt.read_checkpoint(*ckpt.resolve_checkpoint(spec, self.checkpoint_dir))
        directory = spec if spec is not None else self.checkpoint_dir
        choice, loaded = None, None
        if self.ctx.is_main:
            try:
                loaded, damaged = ckpt.find_resumable(directory)
                choice = (str(loaded.model_path), damaged) if loaded is not None else None
            except ckpt.CheckpointError as err:
                choice = str(err)
        choice = broadcast_object(choice)
        if choice is None:
            raise ckpt.CheckpointError(f"no checkpoint to resume from in {directory}; start without --resume")
        if isinstance(choice, str):
            raise ckpt.DamagedCheckpointError(choice)
        path, damaged = choice
        if loaded is None:
            loaded = ckpt.read_checkpoint(path)
        self._resume_notes += [f"passed over a damaged checkpoint: {line}" for line in damaged]
        if damaged:
            self._resume_notes.append(f"resuming from the newest intact checkpoint, {path}")
        return loaded

    # ------------------------------------------------------------------ what methods use

    def next_batch(self) -> dict:
        """The next source batch of this process: {"image": B x 3 x h x w, "label": B x h x w, "name"}."""
        batch = next(self.batches)
        batch["image"] = batch["image"].to(self.device, non_blocking=True)
        batch["label"] = batch["label"].to(self.device, non_blocking=True)
        return batch

    def rebuild_optimizer(self) -> None:
        """(Re)build AdamW from the model's current parameter groups (and re-wrap DDP). Parameters
        that train before and after keep their optimizer state."""
        kept = {"state": {}}
        if self.optimizer is not None:
            kept = optimizer_state_by_name(self.optimizer, self.model)
        self.optimizer = build_optimizer(self.model, self.cfg.train, self.cfg.method.backbone_lr_mult)
        load_optimizer_state_by_name(self.optimizer, self.model, kept, device=self.device)
        if self.ema is not None:  # tensors that start training join the average with their current value
            self.ema.track(self.model, [p for g in self.optimizer.param_groups for p in g["params"]])
        if self._pending_optimizer_state:  # resumed state of parameters that were not training yet
            self._pending_optimizer_state = load_optimizer_state_by_name(
                self.optimizer, self.model, {"state": self._pending_optimizer_state}, device=self.device)
        self.schedule.apply(self.optimizer, self.iteration)
        if self.ctx.distributed and not self.fsdp:
            # a method may name large buffers that are identical on every process by construction;
            # DDP then does not broadcast them before every forward pass
            ignored = getattr(self.model.method, "ddp_buffers_to_ignore", lambda: [])()
            if ignored:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.model, [f"method.{name}" for name in ignored])
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.train.find_unused_parameters)

    # ------------------------------------------------------------------ the loop

    def train(self) -> Path:
        """Run from ``self.iteration`` to ``total_iters``; returns the final model file."""
        cfg, train = self.cfg, self.cfg.train
        main = self.ctx.is_main
        if main:
            for folder in (self.run_dir, self.checkpoint_dir):  # temporary files of a save that was killed
                remove_stale_temp_files(folder)
            save_config(cfg, self.run_dir / "config.yaml")
        log = TrainLogger(self.run_dir / "logs", total_iters=self.total_iters, start_iter=self.iteration,
                          enabled=main, progress_bar=train.progress_bar)
        installed = self.preemption.install()  # SIGTERM/SIGUSR1: finish the step, checkpoint, stop
        try:
            self._announce(log)
            while self.iteration < self.total_iters:
                it = self.iteration
                # the method's own passes (e.g. FisherTune's estimate) run compiled but never checkpointed
                with compile_errors(train), without_checkpointing(self.model.backbone):
                    self.model.method.on_train_iteration(it, self)
                losses, lr = self.train_step(it)
                self.iteration = it + 1
                if self.ema is not None:
                    self.ema.update(self.model, self.iteration)
                log.step(self.iteration, losses["loss"], lr)
                if self.iteration % max(train.log_interval, 1) == 0 or self.iteration == self.total_iters:
                    log.scalars(self.iteration, {**losses, "lr": lr})
                for line in self.batches.take_new_skips():
                    log.info(f"[data] iter {self.iteration}: {line}")
                # one all-reduce: every process stops after the same step if any of them got the signal
                if self.iteration < self.total_iters and (signum := self.preemption.agreed_signal(self.device)):
                    self._stop_for_preemption(log, signum)
                if train.eval_interval > 0 and cfg.data.val and (
                        self.iteration % train.eval_interval == 0 or self.iteration == self.total_iters):
                    self.validate(log)
                if train.checkpoint_interval > 0 and self.iteration % train.checkpoint_interval == 0:
                    self.save_checkpoint(log)
            if self.skipped_steps:
                log.info(f"skipped {self.skipped_steps} of {self.total_iters} optimizer steps (non-finite loss, "
                         "train.nan_policy=skip)")
            self._report_skipped_samples(log)
            return self._save_final(log)
        finally:
            self.batches.close()  # DataLoader workers, also after an error
            if installed:
                self.preemption.uninstall()
            log.close()

    def _stop_for_preemption(self, log: TrainLogger, signum: int) -> None:
        """Checkpoint this iteration on every process, log one line, raise TrainingPreempted."""
        before = len(self.preemption.received)
        self.batches.close()  # no more data needed; the workers go before the save
        path = self.save_checkpoint()
        during = self.preemption.ignored_after(before)
        message = (f"preempted ({signal.Signals(signum).name}): stopped after iteration {self.iteration} of "
                   f"{self.total_iters}, checkpoint {path or self.checkpoint_dir} written; exit code "
                   f"{PREEMPTED_EXIT_CODE}, continue with --resume or --auto-resume")
        if during:
            message += f" ({', '.join(during)} during the save: ignored)"
        log.info(message)
        raise TrainingPreempted(message, path)

    def _gather(self, obj) -> list:
        """``obj`` of every process, in rank order (a collective under DDP)."""
        if not self.ctx.distributed:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _report_skipped_samples(self, log: TrainLogger) -> None:
        """The run's summary of unreadable samples skipped (data.*.on_bad_sample: skip), all processes."""
        total: dict[str, int] = {}
        for counts in self._gather(dict(self.batches.skipped)):
            for path, n in counts.items():
                total[path] = total.get(path, 0) + n
        self.skipped_samples = sum(total.values())
        if total:
            files = ", ".join(f"{path} ({n}x)" for path, n in sorted(total.items())[:10])
            more = f" and {len(total) - 10} more" if len(total) > 10 else ""
            log.info(f"skipped {self.skipped_samples} unreadable samples in {len(total)} file(s) (on_bad_sample=skip): "
                     f"{files}{more}")

    def train_step(self, iteration: int) -> tuple[dict[str, float], float]:
        """One optimizer step of ``grad_accum`` micro-batches; returns the loss terms (mean over
        micro-batches and processes) and the base lr (``train.lr`` on the schedule)."""
        train = self.cfg.train
        self.schedule.apply(self.optimizer, iteration)
        # the base lr, not the first group's: groups scale it (full fine-tuning's backbone group by x 0.1)
        lr = train.lr * self.schedule.factor(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        forward = self.ddp_model if self.ddp_model is not None else self.model
        totals: dict[str, torch.Tensor] = {}
        for micro in range(train.grad_accum):
            batch = self.next_batch()
            last = micro == train.grad_accum - 1
            sync = contextlib.nullcontext() if (last or self.ddp_model is None) else self.ddp_model.no_sync()
            with sync, compile_errors(train), checkpointing_where_needed(self.model):
                with autocast_context(self.amp, self.device):
                    losses = forward(batch["image"], batch["label"], iteration=iteration)
                loss = losses["loss"] / train.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / train.grad_accum
        keys = list(totals)
        values = all_reduce_sum(torch.stack([totals[k] for k in keys])) / self.world_size
        values = dict(zip(keys, values.tolist()))
        if not np.isfinite(values["loss"]):
            return self._non_finite(iteration, values["loss"]), lr
        if self._pending_optimizer_state:
            raise ckpt.CheckpointError(
                f"the resumed checkpoint has optimizer state for parameters that do not train now "
                f"({', '.join(sorted(self._pending_optimizer_state)[:5])}): the method must restore its trainable "
                "set from its state dict, or call trainer.rebuild_optimizer() when it changes it")
        if train.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, train.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.consecutive_skips = 0
        return values, lr

    def _last_good_checkpoint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint had been written yet"
        # a checkpoint is written only after _check_weights passed, and resumed only after the same check
        return f"the last checkpoint ({self.last_checkpoint}, weights checked finite and in range) is intact"

    def _non_finite(self, iteration: int, value: float) -> dict[str, float]:
        train = self.cfg.train
        message = f"non-finite loss ({value}) at iteration {iteration + 1} of {self.total_iters}"
        if train.nan_policy == "stop":
            raise NonFiniteLossError(f"{message}: training stopped and nothing was saved; "
                                     f"{self._last_good_checkpoint()}. Lower train.lr, set train.clip_grad, or "
                                     "train.nan_policy=skip to skip such steps")
        self.consecutive_skips += 1
        if self.consecutive_skips > train.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{message}, {self.consecutive_skips} in a row (train.max_consecutive_skips="
                f"{train.max_consecutive_skips}): skipping does not recover this run; training stopped and nothing "
                f"was saved; {self._last_good_checkpoint()}. Lower train.lr or set train.clip_grad")
        self.skipped_steps += 1
        warnings.warn(f"{message}: optimizer step skipped (train.nan_policy=skip; {self.consecutive_skips} in a row, "
                      f"{self.skipped_steps} in all)", stacklevel=2)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": value}

    def _check_weights(self, what: str) -> None:
        """Refuse to write ``what`` from diverged weights (every process checks: the same weights under
        DDP, so all of them stop together instead of waiting for each other)."""
        bad = fsdp.diverged_tensors(self.model) if self.fsdp else ckpt.diverged_tensors(self.model)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DivergedWeightsError(
                f"the weights diverged by iteration {self.iteration} of {self.total_iters} ({shown}: NaN, inf or "
                f"beyond {ckpt.DIVERGED_WEIGHT:.2g}): {what} was not written; {self._last_good_checkpoint()}. "
                "Lower train.lr or set train.clip_grad")

    # ------------------------------------------------------------------ validation, files

    def averaged_weights(self):
        """A context in which the model holds the EMA weights (with ``train.ema``; else a no-op)."""
        return self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext()

    def _restore_ema(self, state: dict, state_path: Path) -> None:
        if self.ema is None:
            return
        if "ema" in state:
            try:
                self.ema.load_state_dict(state["ema"], self.model, source=str(state_path))
            except ValueError as err:
                raise ckpt.CheckpointError(str(err)) from err
        elif self.ema.started(self.iteration):
            warnings.warn(f"{state_path} holds no weight EMA (train.ema was off): the average starts from the "
                          f"weights of iteration {self.iteration}", stacklevel=3)

    def validate(self, log: Optional[TrainLogger] = None) -> dict[str, float]:
        """mIoU on every ``cfg.data.val`` dataset (source domain; never the targets); with ``train.ema``,
        of the EMA weights."""
        with compile_errors(self.cfg.train), self.averaged_weights():
            results = evaluate_datasets(self.model, self.cfg.data.val, self.cfg, self.ctx, amp=self.amp)
        scores = {f"{r.name}/mIoU": r.miou for r in results}
        if log is not None:
            line = f"[val] iter {self.iteration}: " + ", ".join(f"{r.name} mIoU {r.miou:.2f}" for r in results)
            log.scalars(self.iteration, scores, prefix="val", line=line)
        return scores

    def _training_state(self) -> dict:
        rng = ckpt.capture_rng_state()
        if self.ctx.distributed:  # every process's generators, for an exact resume of each
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        state = {"optimizer": {"state": {}} if self.fsdp else optimizer_state_by_name(self.optimizer, self.model),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                 "rng": rng, "data_position": self.batches.position, "world_size": self.world_size,
                 "batch_size": self.cfg.train.batch_size, "skipped_steps": self.skipped_steps,
                 "consecutive_skips": self.consecutive_skips,
                 "skipped_samples": self._gather(dict(self.batches.skipped))}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_checkpoint(self, log: Optional[TrainLogger] = None) -> Optional[Path]:
        """Checkpoint after ``self.iteration`` iterations (rank 0 writes; every process must call it)."""
        self._check_weights(f"the checkpoint of iteration {self.iteration}")
        state = self._training_state()
        if self.fsdp:  # every process writes its shards (torch.distributed.checkpoint)
            path = self.last_checkpoint = fsdp.save_checkpoint(self, state, keep=self.cfg.train.keep_checkpoints)
            if log is not None:
                log.info(f"checkpoint: {path}")
            return path
        path, failure = None, None
        if self.ctx.is_main:
            try:
                path = ckpt.save_training_checkpoint(self.checkpoint_dir, self.iteration, self.model, self.cfg, state,
                                                     fingerprint=self._fingerprint,
                                                     keep=self.cfg.train.keep_checkpoints)
            except ckpt.DiskFullError as err:
                failure = err
            else:
                self.last_checkpoint = path
                if log is not None:
                    log.info(f"checkpoint: {path}")
        # in place of a barrier: every process learns whether the save failed, and all stop together
        failed = broadcast_object(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if failed is not None:
            raise ckpt.DiskFullError(failed)
        return path

    def _save_final(self, log: TrainLogger) -> Path:
        """``model_final.safetensors``: the weights, or with ``train.ema`` their average (the raw weights
        then go to ``model_final_raw.safetensors``)."""
        path = self.run_dir / FINAL_MODEL_NAME
        metadata = {"iteration": self.iteration, "skipped_steps": self.skipped_steps,
                    "skipped_samples": self.skipped_samples}
        if self.ema is not None:
            with self.averaged_weights():
                self._write_model(path, "the final model (EMA weights)", {**metadata, "weights": "ema"}, log,
                                  "final model (EMA weights)")
            self._write_model(self.run_dir / FINAL_RAW_MODEL_NAME, "the final raw weights",
                              {**metadata, "weights": "raw"}, log, "raw weights")
        else:
            self._write_model(path, "the final model", metadata, log, "final model")
        barrier()
        return path

    def _write_model(self, path: Path, what: str, metadata: dict, log: TrainLogger, label: str) -> None:
        self._check_weights(what)
        if self.fsdp:  # gathered to rank 0: a plain model file
            fsdp.write_model_file(self, path, metadata)
        elif self.ctx.is_main:
            ckpt.save_model(self.model, self.cfg, path, metadata=metadata, fingerprint=self._fingerprint)
        if self.ctx.is_main:
            log.info(f"{label}: {path}")

    def _announce(self, log: TrainLogger) -> None:
        from ..tuning.rein import format_trainable_parameters

        train = self.cfg.train
        effective = train.batch_size * self.world_size * train.grad_accum
        log.info(f"run: {self.run_dir} | {self.world_size} process(es) on {self.device.type} | batch "
                 f"{train.batch_size} x {self.world_size} process(es) x {train.grad_accum} accumulation = {effective}")
        log.info(format_trainable_parameters(self.model.method, self.model.head))
        log.info(describe_precision(self.amp, self.device))
        if self.ema is not None:
            log.info(f"weight EMA: momentum {self.ema.momentum:g} from iteration {max(self.ema.begin_iter, 1)}, "
                     f"{len(self.ema.averages)} tensors, {self.ema.nbytes / 2**20:.1f} MiB")
        for note in self._resume_notes:
            log.info(note)
        if self.iteration:
            log.info(f"resumed at iteration {self.iteration} from {self.last_checkpoint}")

    def _warn_config_changes(self, saved: dict, path: Path) -> None:
        # a resume may also extend the run (train.iters)
        changed = config_differences(saved, to_dict(self.cfg), ignore=(*NON_EXPERIMENT_KEYS, "train.iters"))
        if changed and self.ctx.is_main:
            warnings.warn(f"resuming {path} with a config that differs in: {', '.join(changed[:10])}", stacklevel=3)


