"""Optimisation details that the official prompt-method codebases share (written once).

* :func:`scaled_lr` — the linear learning-rate scaling rule of google-research/l2p
  (``train_continual.py``: ``base_learning_rate = config.learning_rate * global_batch_size / 256``)
  and of its PyTorch ports JH-LEE-KR/l2p-pytorch and JH-LEE-KR/dualprompt-pytorch (``main.py``:
  ``args.lr = args.lr * global_batch_size / 256.0``, where ``global_batch_size`` is the per-device
  batch under their default ``--unscale_lr``; google-research uses the batch over all devices).
  On one device all of them give ``lr * batch / 256``. Their configured learning rate is the
  rate *at batch 256*; the rate actually used is that times ``batch / 256``. A method that follows
  them keeps ``lr`` as the configured (batch-256) rate and declares ``lr_scaling``.
* :func:`clip_grad_norm_before_step` — gradient-norm clipping of everything an optimizer updates,
  right before each of its steps (the same codebases clip the global gradient norm at 1.0:
  ``grad_clip_max_norm`` in the google-research configs, ``--clip-grad`` with
  ``torch.nn.utils.clip_grad_norm_`` in the ports' ``engine.py``). It is attached to the optimizer
  the method returns from ``configure_optimizer``, so the harness's training loop needs no hook.
* :func:`assert_one_task` — a training-batch invariant checked on the device, so that a training
  step never waits for it (issue 14: no host-device synchronisation inside a step).
"""

from __future__ import annotations

import torch

LR_SCALINGS = ("linear_256", "none")


def assert_one_task(task_ids: torch.Tensor, task: int, method: str) -> None:
    """Check that every pair of a training batch belongs to ``task`` without reading the labels
    back to the host: ``torch._assert_async`` raises at once on the CPU and, on CUDA, makes a
    later kernel launch fail (a device-side assert) instead of making this step wait. For methods
    that train one task at a time with no replay memory, where a violation is a programming error."""
    torch._assert_async((task_ids == task).all(),
                        f"{method} trains one task at a time: a training batch holds pairs of a task other than "
                        f"the one being trained ({task})")


def check_lr_scaling(method: str, lr_scaling: str) -> None:
    """One-line ValueError for an unknown ``lr_scaling`` (for a Config's ``__post_init__``)."""
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"{method}.lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {lr_scaling!r}")


def check_clip_grad_norm(method: str, clip_grad_norm: float | None) -> None:
    """One-line ValueError unless ``clip_grad_norm`` is None (off) or positive."""
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"{method}.clip_grad_norm must be > 0, or null to switch clipping off, got {clip_grad_norm}")


def scaled_lr(lr: float, lr_scaling: str, batch_size: int | None) -> float:
    """The learning rate used at ``batch_size``: ``lr * batch_size / 256`` under ``"linear_256"``,
    ``lr`` itself under ``"none"``."""
    if lr_scaling == "none":
        return lr
    if lr_scaling != "linear_256":
        raise ValueError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {lr_scaling!r}")
    if batch_size is None:
        raise RuntimeError("lr_scaling='linear_256' needs the training batch size, which the harness sets on the "
                           "method (Method.train_batch_size) before configure_optimizer; set lr_scaling='none' "
                           "to build the optimizer without it")
    return lr * batch_size / 256.0


def clip_grad_norm_before_step(optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.optim.Optimizer:
    """Make every ``optimizer.step()`` first clip the total gradient norm of the parameters it
    updates to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``, one norm over all of them, as
    the official code does). ``None`` leaves the optimizer as it is. Returns ``optimizer``."""
    if max_norm is None:
        return optimizer

    def clip(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    optimizer.register_step_pre_hook(clip)
    return optimizer


__all__ = ["LR_SCALINGS", "check_clip_grad_norm", "check_lr_scaling", "clip_grad_norm_before_step", "scaled_lr"]
