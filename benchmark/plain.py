"""What a checkpoint may hold: tensors and plain data, the values ``torch.load(weights_only=True)``
reads back without running code (see :mod:`benchmark.checkpoint`)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import CheckpointError

_PLAIN = (bool, int, float, str, type(None), torch.Tensor, torch.dtype, torch.Size)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the first value that ``weights_only`` loading refuses.

    Checked before saving, so a method that puts an arbitrary object into its state fails at
    the first checkpoint with a message naming the key, not at resume time.
    """
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; checkpoints keep plain keys only")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            check_plain(value, f"{where}[{index}]")
        return
    raise CheckpointError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints keep "
                          "tensors and plain data (dict, list, number, string) only, so that they load with "
                          "torch.load(weights_only=True). Keep it as a buffer, or return plain data from "
                          "get_extra_state() (see benchmark/method.py, 'Checkpoints')")
