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
* on CUDA the forward pass runs under bf16 autocast.

Any Avalanche plugin that works on data or the loop (``ReplayPlugin``, LR schedulers, early
stopping, loggers) can be passed in ``plugins``.
"""

from __future__ import annotations

import contextlib

import torch
from avalanche.training.templates import SupervisedTemplate

from methods.base import Method, TrainData

from .losses import info_nce


def _silent_evaluator():
    """Avalanche's metric plugin with no metrics and no loggers (recall is computed by
    :mod:`benchmark.evaluation`); built quietly, since it warns about having no loggers."""
    import warnings

    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(loggers=[])


class ContrastiveStrategy(SupervisedTemplate):
    """Trains a :class:`~methods.base.Method` on an Avalanche stream of image-caption pairs."""

    def __init__(self, *, method: Method, train_epochs: int, train_mb_size: int, eval_mb_size: int,
                 device: torch.device, task_names: list[str], plugins=None, num_workers: int = 0):
        self.method = method
        self.task_names = task_names
        self.num_workers = num_workers
        self.last_train_loss = float("nan")
        self.scheduler = None
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # placeholder, rebuilt per task
        super().__init__(model=method, optimizer=optimizer, criterion=info_nce, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=list(plugins or []), evaluator=_silent_evaluator())
        self._autocast = device.type == "cuda"

    # ---- what a task may see -------------------------------------------------------------------
    def _train_data(self) -> TrainData:
        task = int(self.experience.current_experience)
        return TrainData(task_id=task, task_name=self.task_names[task], dataset=self.experience.dataset,
                         batch_size=self.eval_mb_size, device=self.device)

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
            raise FloatingPointError(f"the training loss became {loss.item()} on task "
                                     f"{self.task_names[int(self.experience.current_experience)]!r}; "
                                     "lower the learning rate")
        self.last_train_loss = float(loss.detach())
        return loss

    def _after_training_epoch(self, **kwargs):
        if self.scheduler is not None:
            self.scheduler.step()
        super()._after_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs):
        self.method.after_training_exp(self._train_data())
        super()._after_training_exp(**kwargs)
