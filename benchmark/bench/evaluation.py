"""Key fitting and evaluation time on a union gallery of N images and 5N captions.

The gallery is the generated photos (:mod:`benchmark.bench.data`), five captions each, split into
two tasks. For each measured method (``lpi`` and ``zeroshot`` when selected, else the first
selected method) the section builds the method as a run does, creates both tasks' parameters
(``before_training_exp``) and then times, with the harness's own code:

* **key fitting** — ``after_training_exp`` of each task: what a run does after a task's
  training (routing keys on frozen features of the task's training pairs, for the methods that
  route; nothing for the others);
* **evaluation** — :func:`benchmark.evaluation.evaluate_session` after the last task, union
  gallery, inferred task identity (LPI's protocol): encode every test image and caption, route,
  rank.

Variants (:func:`cache_variants`): ``no caches`` (every evaluation decodes and encodes every
test item again, as the harness did before :class:`benchmark.evaluation.EvaluationCache`) and
``caches, warm`` (a run's cache after its first session: decoded test crops and frozen,
prompt-free features kept; the warm-up evaluation that fills it is not timed), so their ratio
is what the cache saves from the second session on.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from ..config import Protocol, TrainingConfig
from ..method import Method, TrainData
from .device import synchronize
from .options import EVALUATION_METHODS

TASKS = 2


def evaluation_methods(methods: list[str]) -> list[str]:
    chosen = [m for m in methods if m in EVALUATION_METHODS]
    return chosen or methods[:1]


def cache_variants() -> dict[str, Callable[[], dict]]:
    """Evaluation variants by name -> a function giving fresh keyword arguments of
    ``evaluate_session`` (a new cache per method)."""
    from ..evaluation import EvaluationCache

    return {"no caches": dict, "caches, warm": lambda: {"cache": EvaluationCache()}}


def measure_evaluation(options, items, tick: Callable[[], None]) -> dict:
    """The evaluation section (see the module docstring)."""
    from ..evaluation import evaluate_session, items_to_encode
    from ..method import get_method
    from ..run.factory import build_method
    from .data import bench_scenario
    from .training import quiet_load

    from ..backbone import load_backbone

    scenario = bench_scenario(items, TASKS, options.model)
    protocol = Protocol(gallery="union", task_identity="inferred", tasks="seen")
    device, repeats = options.device, options.profile["repeats"]
    eval_batch = TrainingConfig().eval_batch_size  # what a run encodes with
    rows = []
    for name in evaluation_methods(options.methods):
        cls = get_method(name)
        setup = build_method(cls, cls.Config(), scenario, device, seed=0, config_errors=True,
                             load_backbone=lambda: quiet_load(load_backbone, options.model, str(device)))
        method, streams = setup.method, setup.streams
        fits_keys = type(method).after_training_exp is not Method.after_training_exp
        fit_s = []
        for task in range(TASKS):
            data = TrainData(task_id=task, task_name=scenario.task_names[task],
                             dataset=list(streams.train_stream)[task].dataset, encode_batch_size=eval_batch,
                             device=device)
            method.before_training_exp(data)
            method.to(device)
            synchronize(device)
            start = time.perf_counter()
            method.after_training_exp(data)
            synchronize(device)
            fit_s.append(time.perf_counter() - start)
        pairs = sum(len(p) for p in streams.train_pairs)
        encoded = items_to_encode(streams.galleries, TASKS - 1, protocol)
        for variant, make_settings in cache_variants().items():
            settings = make_settings()
            if settings:  # fill the cache, untimed: a run's first session
                evaluate_session(method, streams.galleries, TASKS - 1, protocol, batch_size=eval_batch,
                                 device=device, **settings)
            times = []
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                evaluate_session(method, streams.galleries, TASKS - 1, protocol, batch_size=eval_batch, device=device,
                                 **settings)
                synchronize(device)
                times.append(time.perf_counter() - start)
                tick()
            seconds = statistics.median(times)
            rows.append({"method": name, "variant": variant, "gallery_images": sum(len(g) for g in streams.galleries),
                         "gallery_captions": sum(len(g.caption_tokens) for g in streams.galleries),
                         "items_encoded": encoded, "eval_s": seconds, "repeats_s": times,
                         "items_per_s": encoded / seconds, "fits_keys": fits_keys,
                         "key_fit_s": sum(fit_s) if fits_keys else 0.0, "key_fit_pairs": pairs if fits_keys else 0,
                         "key_fit_pairs_per_s": pairs / sum(fit_s) if fits_keys and sum(fit_s) > 0 else None})
        del setup, method, streams
    return {"status": "measured", "tasks": TASKS, "protocol": protocol.describe(), "eval_batch_size": eval_batch,
            "rows": rows, "definition": "eval_s: one evaluate_session after the last task (encode, route, rank); "
                                        "key_fit_s: after_training_exp summed over the tasks"}


def evaluation_steps(options) -> int:
    return len(evaluation_methods(options.methods)) * len(cache_variants()) * options.profile["repeats"]
