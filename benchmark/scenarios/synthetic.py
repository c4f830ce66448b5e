"""``synthetic``: the offline default scenario, and the recipe that pretrains its backbone.

The data come from :mod:`benchmark.data.synthetic` (procedural shapes with grammar captions;
its docstring explains the tasks). The default backbone is ``clvl-tiny:synthetic``: the
``clvl-tiny`` open_clip config (``benchmark/backbone/configs``) pretrained here with InfoNCE
on the generator's base split. The weights are cached under the cache folder in a file named
by a hash of the whole recipe (generator version, architecture config, data sizes, seed,
optimisation settings), so a change to any of them retrains and an unchanged recipe never does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backbone.resolve import CONFIG_DIR, _register_shipped_configs
from ..data import synthetic as gen
from ..errors import ConfigError
from ..io import atomic_write_with
from .base import Scenario, ScenarioBuilder

log = logging.getLogger(__name__)


@dataclass
class SyntheticOptions:
    tasks: list[str] = field(default_factory=lambda: list(gen.TASK_ORDER))  # task names, in stream order
    train_images: int = 1000  # training images per task (each with `captions_per_image` pairs)
    test_images: int = 24  # test images per task (distinct described attributes; at most 24)
    captions_per_image: int = 3  # paraphrases per image (>= 2 for multi-caption recall)
    data_seed: int = 0  # fixes the drawn data; the run seed only changes training

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in gen.TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {', '.join(gen.TASK_ORDER)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("synthetic tasks must not repeat")
        if not 1 <= self.captions_per_image <= 4:
            raise ValueError("captions_per_image must be between 1 and 4 (there are 4 paraphrase templates)")
        if self.train_images < 1 or self.test_images < 1:
            raise ValueError("train_images and test_images must be positive")


# Learning rates for the tiny backbone (a user's method_params override them; every record
# stores the values it ran with). The methods' own defaults are their papers' values for
# ViT-B/16 at batch 128 and 5-50 epochs; here a 3.7 M-parameter model gets 141 steps per task.
# Each value below is the one of a small sweep (the paper value, and about 3x and 10x above and
# below it) with the best mean of the final average R@1 in both directions, seed 0 of this
# scenario at its defaults. The sweep used the test split (the scenario has no validation
# split), so treat them as demo defaults, not as tuned results to publish; the sweep and its
# numbers are in docs/methods/README.md. Where the paper value won (S-Prompts, LoRA,
# lpi_released), it is not repeated here.
SYNTHETIC_METHOD_DEFAULTS = {
    "finetune": {"lr": 3e-4},  # CLIP fine-tuning's 1e-5 range barely moves a model this small
    # L2P and DualPrompt scale lr by batch / 256 as their official code does: these base rates
    # give the swept 0.01 and 0.001 at the scenario's batch 64.
    "l2p": {"lr": 0.04},  # official 0.03 at batch 256
    "dualprompt": {"lr": 0.004},  # official 0.005 at batch 256
    "coda": {"lr": 0.003},  # paper 0.001
    "lpi": {"lr": 0.2},  # reference 0.05 (lpi_released diverges at 0.2: its layer loss is unnormalised)
}


def build_synthetic(options: SyntheticOptions, data_root: Path) -> Scenario:
    train, test = [], []
    for name in options.tasks:
        task_train, task_test = gen.make_task(gen.TASKS[name], train_images=options.train_images,
                                              test_images=options.test_images,
                                              captions_per_image=options.captions_per_image, seed=options.data_seed)
        train.append(task_train)
        test.append(task_test)
    info = {"generator_version": gen.GENERATOR_VERSION,
            "tasks": {name: {"background": gen.TASKS[name].background,
                             "captions_describe": list(gen.TASKS[name].described)} for name in options.tasks}}
    return Scenario("synthetic", list(options.tasks), train, test, default_backbone="clvl-tiny:synthetic", info=info,
                    method_defaults=SYNTHETIC_METHOD_DEFAULTS)


SYNTHETIC = ScenarioBuilder(
    name="synthetic", build=build_synthetic, options=SyntheticOptions,
    summary="procedural shapes with grammar captions; tasks shift domain and described attributes",
    needs="nothing (drawn on the fly; its tiny backbone is pretrained once and cached)", num_tasks=len(gen.TASK_ORDER))


# ----------------------------------------------------------------------------- pretraining
@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the synthetic backbone's weights (hashed into the cache key)."""

    arch: str
    images: int = 2000
    captions_per_image: int = 3
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    seed: int = 1234
    generator_version: int = gen.GENERATOR_VERSION

    def key(self) -> str:
        config_file = CONFIG_DIR / f"{self.arch}.json"
        arch_cfg = json.loads(config_file.read_text()) if config_file.exists() else self.arch
        blob = json.dumps({"recipe": asdict(self), "arch_cfg": arch_cfg, "torch": torch.__version__.split("+")[0]},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_synthetic_weights(arch: str, cache_dir: Path) -> Path:
    """Return the cached weight file for ``arch`` pretrained on the base split, training it once."""
    recipe = PretrainRecipe(arch=arch)
    path = Path(cache_dir) / "synthetic" / f"{arch}-{recipe.key()}.pt"
    if path.is_file():
        return path
    if not (CONFIG_DIR / f"{arch}.json").exists():
        raise ConfigError(f"the 'synthetic' weights are made for the tiny configs in {CONFIG_DIR}, not {arch!r}")
    log.info("pretraining the synthetic backbone %s once (cached at %s)", arch, path)
    state = _pretrain(recipe)
    return atomic_write_with(path, lambda handle: torch.save(state, handle))


def _pretrain(recipe: PretrainRecipe) -> dict[str, torch.Tensor]:
    import open_clip
    from tqdm.auto import tqdm

    from ..data.torch_datasets import CaptionPairs
    from ..losses import info_nce

    _register_shipped_configs()
    torch.manual_seed(recipe.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(recipe.arch, pretrained=None)
    tokenizer = open_clip.get_tokenizer(recipe.arch)
    items = gen.make_base_split(images=recipe.images, captions_per_image=recipe.captions_per_image, seed=recipe.seed)
    pairs = CaptionPairs(items, preprocess, tokenizer)
    images = torch.stack([pairs[i][0] for i in range(len(pairs))])  # small: decode once
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * (len(pairs) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    model.train()
    with tqdm(total=steps, desc="pretraining synthetic backbone", unit="step", leave=False) as bar:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(pairs), generator=generator)
            for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
                index = order[start:start + recipe.batch_size]
                image_features, text_features, scale = model(images[index], pairs.tokens[index])
                loss = info_nce(image_features, text_features, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

