"""Turn a :class:`~benchmark.scenarios.base.Scenario` into an Avalanche benchmark.

One experience per task in ``train_stream`` and ``test_stream`` (``benchmark_from_datasets``),
with task labels attached (``with_task_labels``) so that ``experience.task_label`` is the task
index and every item ends with its task label: training items are
``(image, tokens, pair_index, task)``, test items ``(image, image_index, task)``.

Images go through the backbone's open_clip transforms unless the method asks for its own
(:meth:`Streams.use_transforms` with :meth:`benchmark.Method.image_transforms`).

Training batches carry their caption tokens cut to the batch's longest caption
(:class:`TrimmedTokens`, the backbone's :class:`~benchmark.backbone.adapter.TokenTrimmer`): the
text tower then runs only those positions, with the same result, and the cut is made on the
host, before the batch moves to the device. Captions are tokenised through a
:class:`~benchmark.data.token_cache.TokenCache`, so the runs of a grid tokenise them once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_task_labels
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from torch.utils.data import default_collate

from ..backbone import ClipBackbone
from ..backbone.adapter import TokenTrimmer
from ..data import token_cache
from ..data.torch_datasets import CaptionPairs, GalleryImages
from .base import Scenario


@dataclass
class Streams:
    """The Avalanche benchmark plus the per-task galleries evaluation reads captions from."""

    benchmark: Any
    galleries: list[GalleryImages]
    scenario: Scenario
    train_pairs: list[CaptionPairs] | None = None  # the unwrapped training sets (e.g. for caption counts)

    def use_transforms(self, train=None, eval=None) -> None:
        """Put a method's own image transforms on the datasets (None keeps the backbone's).

        The Avalanche experiences wrap these same dataset objects, so the training stream and
        the galleries both see the change (see :mod:`benchmark.data.preprocessing`).
        """
        if train is not None:
            for pairs in self.train_pairs or []:
                pairs.transform = train
        if eval is not None:
            for gallery in self.galleries:
                gallery.transform = eval

    @property
    def train_stream(self):
        return self.benchmark.train_stream

    @property
    def test_stream(self):
        return self.benchmark.test_stream


class TrimmedTokens:
    """Collate for training items ``(image, tokens, pair_index, task)``: PyTorch's default
    collate, then the tokens cut by ``trimmer`` (plain data, so worker processes can take it;
    Avalanche's replay loader collates every batch with its first dataset's collate)."""

    def __init__(self, trimmer: TokenTrimmer):
        self.trimmer = trimmer

    def __call__(self, items: list) -> list:
        batch = default_collate(items)
        batch[1] = self.trimmer(batch[1])
        return batch


def _with_task_label(dataset, task: int, collate_fn=None) -> AvalancheDataset:
    label = DataAttribute(ConstantSequence(task, len(dataset)), "targets_task_labels", use_in_getitem=True)
    return AvalancheDataset([dataset], data_attributes=[label], collate_fn=collate_fn)


def make_streams(scenario: Scenario, backbone: ClipBackbone, cache: token_cache.TokenCache | None = None) -> Streams:
    """Datasets with the backbone's transforms and tokenizer, wrapped as an Avalanche benchmark;
    ``cache``: where token ids are kept between runs (None: this process only)."""
    train_sets, test_sets, galleries, train_pairs = [], [], [], []
    collate = TrimmedTokens(backbone.token_trimmer())
    for task, (train, test) in enumerate(zip(scenario.train, scenario.test)):
        with token_cache.using(cache):
            pairs = CaptionPairs(train, backbone.preprocess_train, backbone.tokenizer)
            gallery = GalleryImages(test, backbone.preprocess_eval, backbone.tokenizer)
        train_sets.append(_with_task_label(pairs, task, collate))
        test_sets.append(_with_task_label(gallery, task))
        galleries.append(gallery)
        train_pairs.append(pairs)
    benchmark = with_task_labels(benchmark_from_datasets(train=train_sets, test=test_sets))
    return Streams(benchmark=benchmark, galleries=galleries, scenario=scenario, train_pairs=train_pairs)
