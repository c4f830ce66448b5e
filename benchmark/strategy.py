"""The training loop: an Avalanche ``SupervisedTemplate`` taught contrastive image-text training.

Avalanche's template already owns the loop (epochs, iterations, plugin callbacks, data
loaders, replay's buffer-mixing loader); what changes for retrieval is small and lives here:

* a mini-batch is ``(images, tokens, pair_index, task)``: ``mb_x`` is the images,
  ``mb_y`` the caption tokens and ``mb_task_id`` the task labels;
* ``forward`` asks the method for features (``Method.training_features``) and ``criterion``
  is symmetric InfoNCE plus the method's ``extra_loss``;
* the optimizer is rebuilt for every task from ``Method.trainable_parameters()`` by
  ``Method.configure_optimizer`` (Avalanche's default would put every parameter, frozen ones
  included, into one group); its optional scheduler steps once per epoch;
* the method's hooks run at the right moments: ``before_training_exp`` inside model
  adaptation (before the optimizer is built, so new parameters are optimised) and
  ``after_training_exp`` once the task's epochs are over;
* the forward pass runs at ``training.precision`` (:mod:`benchmark.precision`: bf16 autocast
  on CUDA by default, float32 on the CPU; fp16 adds a gradient scaler), optionally through
  ``torch.compile`` (``training.compile``);
* a run can stop and continue (:mod:`benchmark.checkpoint`): ``step_hook`` is called after
  every training step (the runner saves a checkpoint there when one is due or a stop was
  asked for), the RNG state at the start of each epoch is kept in ``epoch_rng``, and
  ``resume_at`` makes the next ``train()`` continue inside a task: it loads the saved state
  once the task's parameters and optimizer exist, then replays the data order of the
  interrupted epoch and skips the steps already done;
* a loss that is NaN or infinite stops training with :class:`~benchmark.errors.TrainingDiverged`,
  naming the first bad step. A step never waits for the device: the loss stays a device tensor
  (``last_train_loss`` reads it only when someone asks), and its finiteness is folded into a
  device-side record (:class:`DivergenceWatch`) that the host reads every ``check_every`` steps,
  at the end of every epoch and before every checkpoint (:meth:`ContrastiveStrategy.check_divergence`),
  so a checkpoint is never written after an undetected NaN.
* under ``--ddp`` (:mod:`benchmark.distributed`) each process loads its part of every global
  batch, computes its share of the whole batch's loss from everyone's features, and the
  gradients are summed over processes before the update; the method's parameters and buffers
  are copied from process 0 when a task starts and when it ends.
* the training loader is :func:`benchmark.data.loading.train_loader`: workers persist through a
  task's epochs, every item's augmentation is seeded by (``seed``, task, epoch, index) so the
  model does not depend on ``num_workers``, and images arrive as uint8 crops that
  ``_unpack_minibatch`` normalises on the device (``image_input``, see
  :mod:`benchmark.data.decode`).

Any Avalanche plugin that works on data or the loop (``ReplayPlugin``, LR schedulers, early
stopping, loggers) can be passed in ``plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor

from .method import Method, TrainData

from . import distributed
from . import precision as amp
from .config import COMPILE_MODES
from .data.decode import ModelInput, to_model_input
from .data.loading import epoch_sampler, resolve_num_workers, train_loader
from .errors import ConfigError, TrainingDiverged
from .losses import info_nce, info_nce_share
from .rng import capture_rng, restore_rng


def train_data(experience, task_names: list[str], *, encode_batch_size: int, device: torch.device,
               num_workers: int = 0, precision: str = "auto") -> TrainData:
    """What a method's ``before_training_exp`` / ``after_training_exp`` get for the task of
    ``experience``: its training pairs, to be encoded in batches of ``encode_batch_size`` (the
    evaluation batch size). The one definition: a rebuilt run (resume, :mod:`benchmark.testing`)
    replays these hooks, and must hand the method exactly what training handed it."""
    task = int(experience.current_experience)
    return TrainData(task_id=task, task_name=task_names[task], dataset=experience.dataset,
                     encode_batch_size=encode_batch_size,
                     device=device, num_workers=num_workers, precision=precision)


def clock_state(clock) -> dict[str, int]:
    """Avalanche's counters (iterations, epochs, experiences) as plain ints."""
    return {k: v for k, v in vars(clock).items() if isinstance(v, int) and not isinstance(v, bool)}


def restore_clock(clock, state: dict[str, int]) -> None:
    for key, value in state.items():
        setattr(clock, key, value)


@dataclass
class ResumePoint:
    """Where to continue inside a task, and the state to load once the task is set up.

    ``load_state`` is called with the strategy after the method's ``before_training_exp``
    and the optimizer have run for the task, so that the state dicts have somewhere to go.
    """

    epoch: int  # 0-based epoch that was interrupted
    iteration: int  # steps of that epoch already done
    epoch_rng: dict[str, Any]  # RNG state when that epoch's data order was drawn
    step_rng: dict[str, Any]  # RNG state right after the last step done
    clock: dict[str, int]  # Avalanche's counters at that moment
    load_state: Callable[["ContrastiveStrategy"], None]


class DivergenceWatch:
    """The first non-finite training loss of an epoch, kept on the device.

    :meth:`observe` is called with every step's loss and never reads it back: it updates two
    device scalars (the epoch's first bad step index, -1 while none, and the loss there) with a
    few element-wise ops. :meth:`first_bad` reads them, one host-device synchronisation, and
    returns ``(step, loss)`` with ``step`` 0-based within the epoch, or None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new epoch: no bad step, step counter at 0."""
        self.step = torch.zeros((), dtype=torch.long, device=self.device)  # steps observed this epoch
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self.unread = 0  # steps observed since the host last looked

    def observe(self, loss: Tensor) -> None:
        loss = loss.detach().float().reshape(())
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first, self.step, self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.step += 1
        self.unread += 1

    def first_bad(self) -> tuple[int, float] | None:
        self.unread = 0
        step = int(self.bad_step)
        return None if step < 0 else (step, float(self.bad_loss))


def _silent_evaluator():
    """Avalanche's metric plugin with no metrics and no loggers (recall is computed by
    :mod:`benchmark.evaluation`); built quietly, since it warns about having no loggers."""
    import warnings

    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(loggers=[])


class ContrastiveStrategy(SupervisedTemplate):
    """Trains a :class:`~benchmark.method.Method` on an Avalanche stream of image-caption pairs.

    ``precision``: ``training.precision`` (:mod:`benchmark.precision`). ``compile``:
    ``training.compile``; other than ``none``, the method's ``training_features`` runs through
    ``torch.compile`` with that mode (``reduce-overhead`` adds CUDA graphs on CUDA).
    """

    check_every = 50  # steps between two host reads of the divergence record (see DivergenceWatch)

    def __init__(self, *, method: Method, train_epochs: int, train_mb_size: int, eval_mb_size: int,
                 device: torch.device, task_names: list[str], plugins=None, num_workers: int | str = 0,
                 step_hook: Callable[["ContrastiveStrategy"], None] | None = None, seed: int = 0,
                 image_input: ModelInput | None = None, precision: str = "auto", compile: str = "none"):
        self.method = method
        self.task_names = task_names
        self.num_workers = resolve_num_workers(num_workers, device)
        self.seed = seed  # of the per-item augmentation and the data order
        self.image_input = image_input  # the device stage of the training transform
        self._train_loss: Tensor | float = float("nan")
        self.scheduler = None
        self.step_hook = step_hook
        self.resume_at: ResumePoint | None = None
        self.epoch = 0  # current epoch within the task (0-based)
        self.epoch_iteration = 0  # steps done in the current epoch
        self.epoch_rng: dict[str, Any] | None = None
        self.rng_before_plugins_after_exp: dict[str, Any] | None = None
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # placeholder, rebuilt per task
        super().__init__(model=method, optimizer=optimizer, criterion=info_nce, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=list(plugins or []), evaluator=_silent_evaluator())
        self.precision = amp.resolve(precision, device)
        self.scaler = amp.grad_scaler(device, precision)
        self.watch = DivergenceWatch(self.device)
        if compile not in COMPILE_MODES:
            raise ConfigError(f"training.compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.compile_mode = compile
        self._training_features = None  # built on first use (see forward)

    # ---- the loss, read only on demand -----------------------------------------------------------
    @property
    def last_train_loss(self) -> float:
        """The last step's loss as a float. Reading it waits for the device (a synchronisation):
        progress bars and loggers read it at their own pace, not every step."""
        return float(self._train_loss)

    @last_train_loss.setter
    def last_train_loss(self, value: float) -> None:
        self._train_loss = value

    @property
    def train_loss(self) -> Tensor | float:
        """The last step's loss as it is: a detached device tensor (a float before any step)."""
        return self._train_loss

    # ---- what a task may see -------------------------------------------------------------------
    def _train_data(self) -> TrainData:
        return train_data(self.experience, self.task_names, encode_batch_size=self.eval_mb_size, device=self.device,
                          num_workers=self.num_workers, precision=self.precision)

    # ---- model and optimizer -------------------------------------------------------------------
    def model_adaptation(self, model=None):
        model = model if model is not None else self.model
        if self.is_training:
            model.before_training_exp(self._train_data())
            if distributed.world_size() > 1:  # new parameters drawn alike everywhere: process 0's
                distributed.broadcast_module(model.to(self.device))
        return model.to(self.device)

    def make_optimizer(self, **kwargs):
        params = [p for p in self.method.trainable_parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"method {self.method.name!r} has nothing to train; set `trains = False` on it")
        steps = max(1, len(self.dataloader)) if getattr(self, "dataloader", None) is not None else 1
        self.method.train_batch_size = self.train_mb_size  # for batch-scaled learning rates
        self.optimizer, self.scheduler = self.method.configure_optimizer(params, self.train_epochs, steps)
        self.optimized_param_id = {id(p): p for p in params}

    def check_model_and_optimizer(self, **kwargs):
        self.model = self.model_adaptation()
        self.make_optimizer()

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                              drop_last=False, **kwargs):
        # Contrastive batches of one pair carry no negatives: drop a last batch of size 1.
        drop_last = drop_last or len(self.adapted_dataset) % self.train_mb_size == 1
        # One task per experience, so Avalanche's task-balanced loader would be a plain shuffle.
        # Under --ddp every process draws the same seeded order and takes its part of each global batch.
        shard = (distributed.rank(), distributed.world_size()) if distributed.world_size() > 1 else None
        self.dataloader = train_loader(self.adapted_dataset, batch_size=self.train_mb_size, seed=self.seed,
                                       num_workers=self.num_workers, device=self.device, drop_last=drop_last,
                                       shuffle=shuffle, collate_fn=self.adapted_dataset.collate_fn,
                                       uint8=self.image_input is not None,  # else float batches, as before
                                       shard=shard)

    def _unpack_minibatch(self):
        super()._unpack_minibatch()  # every field to the device (non-blocking)
        self.mbatch[0] = to_model_input(self.mbatch[0], self.image_input)
        width = getattr(getattr(self.method, "backbone", None), "context_length", None)
        if self.compile_mode != "none" and width is not None and self.mbatch[1].shape[1] < width:
            # The collate cuts every batch's captions to its longest (exact, and cheaper), so the
            # width changes from batch to batch; a compiled step (a CUDA graph) would be built
            # again for every width. Compiled, the ids keep the full context width instead.
            self.mbatch[1] = torch.nn.functional.pad(self.mbatch[1], (0, width - self.mbatch[1].shape[1]))

    # ---- one step ------------------------------------------------------------------------------
    def forward(self):
        if self._training_features is None:
            self._training_features = self.method.training_features
            if self.compile_mode != "none":
                self._training_features = torch.compile(self._training_features, mode=self.compile_mode)
        with amp.autocast(self.device, self.precision):
            return self._training_features(self.mb_x, self.mb_y, self.mb_task_id)

    def criterion(self):
        image_features, text_features = self.mb_output
        split = distributed.world_size() > 1
        if split:  # this process's share of the whole batch's loss; the shares add up to it
            sizes = distributed.gather_sizes(len(image_features), image_features.device)
            offset, total = sum(sizes[:distributed.rank()]), sum(sizes)
            loss = info_nce_share(image_features, text_features,
                                  distributed.gather_with_grad(image_features, sizes),
                                  distributed.gather_with_grad(text_features, sizes),
                                  self.method.logit_scale(), offset, total)
        else:
            loss = info_nce(image_features, text_features, self.method.logit_scale())
        extra = self.method.extra_loss()
        if extra is not None:  # a mean over the batch: each process adds its pairs' part of it
            loss = loss + (extra * (len(image_features) / total) if split else extra)
        whole = distributed.sum_scalar(loss) if split else loss  # the same in every process
        self.watch.observe(whole)  # no host read here: see check_divergence
        self._train_loss = whole.detach()
        return loss

    def backward(self):
        if self.scaler is None:
            super().backward()
        else:
            self.scaler.scale(self.loss).backward(retain_graph=self.retain_graph)
        if distributed.world_size() > 1:  # every process: the gradient of the whole batch's loss
            distributed.sum_gradients(list(self.optimized_param_id.values()))

    def optimizer_step(self):
        if self.scaler is None:
            return super().optimizer_step()
        self.scaler.step(self.optimizer)  # skips the step when the scaled gradients overflowed
        self.scaler.update()

    def check_divergence(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss of this epoch so far was NaN or infinite,
        naming the first such step; a no-op when every step since the last check was read.
        Called every ``check_every`` steps, at the end of each epoch and by the runner before
        it saves a checkpoint inside a task."""
        if self.watch.unread == 0:
            return
        bad = self.watch.first_bad()
        if bad is None:
            return
        step, value = bad
        task = self.task_names[int(self.experience.current_experience)]
        raise TrainingDiverged(f"the training loss of {self.method.name!r} became {value} on task "
                               f"{task!r} (epoch {self.epoch + 1}, step {step + 1}); "
                               "lower the learning rate (method_params.<method>.lr)")

    # ---- the loop, with room to stop and continue -------------------------------------------
    def _train_exp(self, experience, eval_streams=None, **kwargs):
        # Avalanche's epoch loop, plus a start epoch when continuing an interrupted task.
        resume, self.resume_at = self.resume_at, None
        first_epoch = 0
        if resume is not None:
            resume.load_state(self)
            first_epoch = resume.epoch
        for self.epoch in range(first_epoch, self.train_epochs):
            self._before_training_epoch(**kwargs)
            if self._stop_training:  # early stopping, as in Avalanche
                self._stop_training = False
                break
            if resume is not None and self.epoch == resume.epoch:
                restore_rng(resume.epoch_rng)  # the interrupted epoch's data order, drawn again
                self.training_epoch(resume=resume, **kwargs)
            else:
                self.training_epoch(**kwargs)
            self._after_training_epoch(**kwargs)

    def training_epoch(self, resume: ResumePoint | None = None, **kwargs):
        """One pass over the task's data: Avalanche's step sequence (callbacks, zero_grad,
        forward, loss, backward, update). When continuing an interrupted epoch, the steps done
        before the interruption are fast-forwarded: their batches are still drawn (so every
        later batch is the same) but not trained on, then the RNG and clock are put back as
        they were after the last step done."""
        self.epoch_rng = capture_rng()  # before the loader draws this epoch's order
        self.epoch_iteration = 0
        self.watch.reset()
        sampler = epoch_sampler(self.dataloader)  # None for a plugin's loader (replay)
        if sampler is not None:
            sampler.set_epoch(int(self.experience.current_experience), self.epoch)
        skip = resume.iteration if resume is not None else 0

        def caught_up():
            restore_rng(resume.step_rng)
            restore_clock(self.clock, resume.clock)

        if resume is not None and skip == 0:
            caught_up()
        for self.mbatch in self.dataloader:
            if self.epoch_iteration < skip:
                self.epoch_iteration += 1
                self.watch.step += 1  # steps done before the interruption count for the step number
                if self.epoch_iteration == skip:
                    caught_up()
                continue
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)
            self.loss += self.criterion()
            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            self._before_update(**kwargs)
            self.optimizer_step()
            self._after_update(**kwargs)
            self.epoch_iteration += 1
            self._after_training_iteration(**kwargs)

    def _after_training_iteration(self, **kwargs):
        super()._after_training_iteration(**kwargs)  # plugins, then Avalanche's clock
        if self.watch.unread >= self.check_every:
            self.check_divergence()
        if self.step_hook is not None:
            self.step_hook(self)

    def _after_training_epoch(self, **kwargs):
        self.check_divergence()
        if self.scheduler is not None:
            self.scheduler.step()
        super()._after_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs):
        self.method.after_training_exp(self._train_data())
        if distributed.world_size() > 1:  # keys fitted, parts frozen: process 0's, everywhere
            distributed.broadcast_module(self.method)
        # Replay's memory is rebuilt on resume by repeating the plugins' after_training_exp
        # from this RNG state (see benchmark.checkpoint).
        self.rng_before_plugins_after_exp = capture_rng()
        super()._after_training_exp(**kwargs)
