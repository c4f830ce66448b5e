"""The one place where a backbone name becomes a model.

Accepted names (``--backbone`` / ``backbone:`` in YAML):

=============================  ==========================================================
``ViT-B-16:openai``            an open_clip architecture and one of its pretrained tags
                               (``python -c "import open_clip; print(open_clip.list_pretrained())"``)
``ViT-B-16:/path/weights.bin`` an architecture and a local weight file (.bin/.pt/.pth/.safetensors)
``local-dir:/path/to/model``   a folder in open_clip's hub layout (``open_clip_config.json`` + weights)
``hf-hub:org/name``            an open_clip model on the Hugging Face hub (or in its local cache)
``clvl-tiny``                  an architecture with random weights (tests, debugging)
``clvl-tiny:synthetic``        weights the harness makes itself (see :func:`register_weight_recipe`)
=============================  ==========================================================

Architectures are open_clip's own plus the configs shipped in ``benchmark/backbone/configs``.
Downloads follow open_clip's usual cache; offline, a tag that is not cached fails at once with
advice instead of retrying (set ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Callable

from ..errors import BenchmarkError, DataError, RegistryError
from ..registry import BrokenEntry, Registry, did_you_mean
from .adapter import ClipBackbone

log = logging.getLogger(__name__)

# Package data of ``benchmark.backbone`` (pyproject's [tool.setuptools.package-data]). open_clip
# reads configs from a folder, so this must be a real directory: true for any unpacked install.
CONFIG_DIR = Path(os.fspath(resources.files(__package__).joinpath("configs")))
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
RANDOM_TAGS = ("", "none", "random")

_configs_registered = False


def _check_recipe(make_weights, origin: str) -> None:
    if not callable(make_weights):
        raise BrokenEntry(f"{origin} is not a function (arch, cache_dir) -> weight file")


# tag -> function(arch, cache_dir) returning a weight file the harness made (and cached). The
# synthetic scenario's recipe is imported only when its tag is used.
_WEIGHT_RECIPES = Registry("weight recipe", check=_check_recipe)
_WEIGHT_RECIPES.add_lazy("synthetic", "benchmark.scenarios.synthetic:pretrained_synthetic_weights")


def register_weight_recipe(tag: str, make_weights: Callable[[str, Path], Path]) -> None:
    """Let ``ARCH:tag`` name weights that the harness produces itself (e.g. by pretraining).

    ``make_weights(arch, cache_dir)`` must return the path of an open_clip state-dict file,
    creating it on first use and reusing it afterwards. A later recipe for the same tag
    replaces the earlier one.
    """
    _WEIGHT_RECIPES[tag] = make_weights  # item assignment: a registry (or a test's plain dict) replaces


def _register_shipped_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        import open_clip

        if not any(CONFIG_DIR.glob("*.json")):
            raise BenchmarkError(f"the backbone configs shipped with the harness are missing from {CONFIG_DIR} "
                                 "(a broken install: reinstall clvl-benchmark)")
        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def list_architectures() -> list[str]:
    import open_clip

    _register_shipped_configs()
    return sorted(open_clip.list_models())


def parse_backbone_name(name: str) -> tuple[str, str | None]:
    """Split ``"ARCH:TAG"`` into ``(ARCH, TAG)``; hub/local-dir schemas are kept whole."""
    name = name.strip()
    if not name:
        raise RegistryError("empty backbone name; use e.g. 'ViT-B-16:openai' or 'clvl-tiny'")
    if name.startswith(("local-dir:", "hf-hub:")):
        return name, None
    arch, _, tag = name.partition(":")
    return arch, tag


def load_backbone(name: str, *, cache_dir: Path | None = None, device: str = "cpu") -> ClipBackbone:
    """Resolve ``name`` (see the module docstring) into a :class:`ClipBackbone` on ``device``."""
    import open_clip

    _register_shipped_configs()
    arch, tag = parse_backbone_name(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pretrained: str | None

    if tag is None:  # local-dir: / hf-hub:
        if arch.startswith("local-dir:"):
            folder = Path(arch.split(":", 1)[1]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise DataError(f"backbone folder {folder} has no open_clip_config.json; "
                                "a local-dir: backbone needs open_clip's hub layout (config + weights)")
        pretrained = None
    else:
        if arch not in open_clip.list_models():
            hint = did_you_mean(arch, open_clip.list_models(), n=5)
            raise RegistryError(f"unknown backbone architecture {arch!r}{hint}; "
                                "`python -c \"import open_clip; print(open_clip.list_models())\"` lists them")
        pretrained = _resolve_tag(arch, tag, cache_dir)

    try:
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device, cache_dir=str(cache_dir / "open_clip"))
    except RuntimeError as error:
        if "Failed to download" in str(error) or "offline" in str(error).lower():
            raise BenchmarkError(
                f"could not get the weights of {name} (no network or not cached): download them and pass the "
                f"file, e.g. --backbone {arch}:/path/to/open_clip_pytorch_model.bin") from None
        raise
    tokenizer = open_clip.get_tokenizer(arch)
    log.info("backbone %s: %.1f M parameters", name, sum(p.numel() for p in model.parameters()) / 1e6)
    return ClipBackbone(model, preprocess_train, preprocess_eval, tokenizer, spec=name).to(device)


def _resolve_tag(arch: str, tag: str, cache_dir: Path) -> str | None:
    import open_clip

    if tag.lower() in RANDOM_TAGS:
        log.warning("backbone %s has random weights (no pretrained tag given)", arch)
        return None
    if tag in _WEIGHT_RECIPES:
        return str(_WEIGHT_RECIPES[tag](arch, cache_dir))
    looks_like_path = os.sep in tag or tag.endswith(WEIGHT_SUFFIXES)
    if looks_like_path:
        path = Path(tag).expanduser()
        if not path.is_file():
            raise DataError(f"backbone weight file {path} does not exist; give the path of an open_clip checkpoint")
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        known = ", ".join(tags + sorted(_WEIGHT_RECIPES)) or "none"
        raise RegistryError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {known}; "
                            "or give a weight file path")
    return tag


def default_cache_dir() -> Path:
    """``$CLVL_CACHE``, else ``~/.cache/clvl-benchmark``: pretrained tiny models, downloads."""
    return Path(os.environ.get("CLVL_CACHE", Path.home() / ".cache" / "clvl-benchmark")).expanduser()
