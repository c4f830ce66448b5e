"""Sequential fine-tuning, optionally with experience replay.

Trains chosen parts of the backbone on each task in turn with the symmetric InfoNCE loss,
with nothing to protect earlier tasks: the standard lower bound for forgetting in continual
learning. With ``replay_memory > 0`` Avalanche's ``ReplayPlugin`` keeps a class-agnostic
reservoir of earlier image-caption pairs and mixes it into each batch (the classic
experience-replay baseline).

``trainable`` picks what trains: ``all``, or any of ``visual`` (image tower incl. its
projection), ``text`` (token/positional embeddings, text transformer, final LayerNorm,
projection) and ``logit_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmark.method import Method, MethodConfig

_PARTS = ("visual", "text", "logit_scale")


@dataclass
class FinetuneConfig(MethodConfig):
    lr: float = field(default=1e-4, metadata={"help": (
        "AdamW learning rate; full fine-tuning needs a much smaller step than prompts")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    trainable: list[str] = field(default_factory=lambda: ["all"], metadata={"help": (
        '"all" or parts: visual, text, logit_scale')})
    replay_memory: int = field(default=0, metadata={"help": (
        "image-caption pairs kept by Avalanche's ReplayPlugin (0 = no replay)")})

    def __post_init__(self):
        parts = set(self.trainable)
        unknown = parts - set(_PARTS) - {"all"}
        if unknown or not parts:
            raise ValueError(f"finetune.trainable: unknown part(s) {sorted(unknown)}; "
                             f"use 'all' or any of {', '.join(_PARTS)}")
        if self.replay_memory < 0:
            raise ValueError("finetune.replay_memory must be >= 0")


class Finetune(Method):
    name = "finetune"
    Config = FinetuneConfig
    summary = "sequential fine-tuning of the backbone (optionally with Avalanche replay)"
    supports_ddp = True  # plain InfoNCE on the batch; replay is refused below

    @classmethod
    def ddp_refusal(cls, config):
        if config.replay_memory > 0:
            return (f"its replay memory (replay_memory={config.replay_memory}) would be filled and mixed in "
                    "separately by every process; set replay_memory to 0")
        return None

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)
        parts = set(self.config.trainable)
        if "all" in parts:
            parts = set(_PARTS)
        model = backbone.model
        for name, param in model.named_parameters():
            part = "visual" if name.startswith("visual.") else "logit_scale" if name == "logit_scale" else "text"
            param.requires_grad_(part in parts)

    def plugins(self) -> list:
        if self.config.replay_memory == 0:
            return []
        from avalanche.training.plugins import ReplayPlugin

        return [ReplayPlugin(mem_size=self.config.replay_memory)]
