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
* on CUDA the forward pass runs under bf16 autocast;
* a run can stop and continue (:mod:`benchmark.checkpoint`): ``step_hook`` is called after
  every training step (the runner saves a checkpoint there when one is due or a stop was
  asked for), the RNG state at the start of each epoch is kept in ``epoch_rng``, and
  ``resume_at`` makes the next ``train()`` continue inside a task: it loads the saved state
  once the task's parameters and optimizer exist, then replays the data order of the
  interrupted epoch and skips the steps already done;
* a loss that is NaN or infinite stops training with :class:`~benchmark.errors.TrainingDiverged`.

Any Avalanche plugin that works on data or the loop (``ReplayPlugin``, LR schedulers, early
stopping, loggers) can be passed in ``plugins``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from avalanche.training.templates import SupervisedTemplate

from .method import Method, TrainData

from .errors import TrainingDiverged
from .losses import info_nce
from .rng import capture_rng, restore_rng


def train_data(experience, task_names: list[str], *, encode_batch_size: int, device: torch.device,
               num_workers: int = 0) -> TrainData:
    """What a method's ``before_training_exp`` / ``after_training_exp`` get for the task of
    ``experience``: its training pairs, to be encoded in batches of ``encode_batch_size`` (the
    evaluation batch size). The one definition: a rebuilt run (resume, :mod:`benchmark.testing`)
    replays these hooks, and must hand the method exactly what training handed it."""
    task = int(experience.current_experience)
    return TrainData(task_id=task, task_name=task_names[task], dataset=experience.dataset,
                     encode_batch_size=encode_batch_size,
                     device=device, num_workers=num_workers)


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


def _silent_evaluator():
    """Avalanche's metric plugin with no metrics and no loggers (recall is computed by
    :mod:`benchmark.evaluation`); built quietly, since it warns about having no loggers."""
    import warnings

    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(loggers=[])


class ContrastiveStrategy(SupervisedTemplate):
    """Trains a :class:`~benchmark.method.Method` on an Avalanche stream of image-caption pairs."""

    def __init__(self, *, method: Method, train_epochs: int, train_mb_size: int, eval_mb_size: int,
                 device: torch.device, task_names: list[str], plugins=None, num_workers: int = 0,
                 step_hook: Callable[["ContrastiveStrategy"], None] | None = None):
        self.method = method
        self.task_names = task_names
        self.num_workers = num_workers
        self.last_train_loss = float("nan")
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
        self._autocast = device.type == "cuda"

    # ---- what a task may see -------------------------------------------------------------------
    def _train_data(self) -> TrainData:
        return train_data(self.experience, self.task_names, encode_batch_size=self.eval_mb_size, device=self.device,
                          num_workers=self.num_workers)

    # ---- model and optimizer -------------------------------------------------------------------
    def model_adaptation(self, model=None):
        model = model if model is not None else self.model
        if self.is_training:
            model.before_training_exp(self._train_data())
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
        super().make_train_dataloader(num_workers=self.num_workers, shuffle=shuffle, pin_memory=pin_memory,
                                      persistent_workers=persistent_workers, drop_last=drop_last, **kwargs)

    # ---- one step ------------------------------------------------------------------------------
    def forward(self):
        context = torch.autocast("cuda", dtype=torch.bfloat16) if self._autocast else contextlib.nullcontext()
        with context:
            return self.method.training_features(self.mb_x, self.mb_y, self.mb_task_id)

    def criterion(self):
        image_features, text_features = self.mb_output
        loss = info_nce(image_features, text_features, self.method.logit_scale())
        extra = self.method.extra_loss()
        if extra is not None:
            loss = loss + extra
        if not torch.isfinite(loss):
            task = self.task_names[int(self.experience.current_experience)]
            raise TrainingDiverged(f"the training loss of {self.method.name!r} became {loss.item()} on task "
                                   f"{task!r} (epoch {self.epoch + 1}, step {self.epoch_iteration + 1}); "
                                   "lower the learning rate (method_params.<method>.lr)")
        self.last_train_loss = float(loss.detach())
        return loss

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
        skip = resume.iteration if resume is not None else 0

        def caught_up():
            restore_rng(resume.step_rng)
            restore_clock(self.clock, resume.clock)

        if resume is not None and skip == 0:
            caught_up()
        for self.mbatch in self.dataloader:
            if self.epoch_iteration < skip:
                self.epoch_iteration += 1
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
        if self.step_hook is not None:
            self.step_hook(self)

    def _after_training_epoch(self, **kwargs):
        if self.scheduler is not None:
            self.scheduler.step()
        super()._after_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs):
        self.method.after_training_exp(self._train_data())
        # Replay's memory is rebuilt on resume by repeating the plugins' after_training_exp
        # from this RNG state (see benchmark.checkpoint).
        self.rng_before_plugins_after_exp = capture_rng()
        super()._after_training_exp(**kwargs)
