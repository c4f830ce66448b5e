"""Backbones: name resolution (:mod:`.resolve`), the prompt-aware adapter (:mod:`.adapter`)
and the prompt description methods hand to it (:mod:`.prompts`)."""

from .adapter import ClipBackbone
from .prompts import Prompts
from .resolve import (default_cache_dir, list_architectures, load_backbone, pretrained_for, register_weight_recipe,
                      warn_if_pretrained_elsewhere)

__all__ = ["ClipBackbone", "Prompts", "default_cache_dir", "list_architectures", "load_backbone", "pretrained_for",
           "register_weight_recipe", "warn_if_pretrained_elsewhere"]
