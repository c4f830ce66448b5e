"""TextPromptTuning: one learnable text prompt shared by all tasks (CoOp-style).

The "Add your own method" example. P prompt vectors (N(0, 0.02)) take the P positions right
after the start-of-text token of every caption (the backbone's ``Prompts(tokens=...)`` hook);
the backbone stays frozen, images are encoded as pretrained. One prompt for every task, so it
needs no task identity (and supports both protocols).

Run it:    python -m benchmark run --methods examples.my_method:TextPromptTuning
Check it:  from benchmark import check_method; check_method(TextPromptTuning)
"""

from dataclasses import dataclass

import torch
from torch import nn

from benchmark import Method, MethodConfig, Prompts


@dataclass
class TextPromptConfig(MethodConfig):
    lr: float = 1e-2  # prompts train with a much larger step than backbone weights
    num_tokens: int = 4  # P: learnable tokens after the start-of-text token

    def __post_init__(self):  # checked when the run is planned, before anything trains
        if self.num_tokens < 1:
            raise ValueError("textprompt.num_tokens must be >= 1")


class TextPromptTuning(Method):
    name = "textprompt"
    Config = TextPromptConfig
    summary = "a learnable text prompt shared by all tasks (CoOp-style)"

    def __init__(self, backbone, config=None, num_tasks=1):
        super().__init__(backbone, config, num_tasks)  # freezes the backbone
        self.prompt = nn.Parameter(torch.empty(1, self.config.num_tokens, backbone.text_width).normal_(0, 0.02))

    def encode_texts(self, tokens, task_ids=None):
        return self.backbone.encode_text(tokens, Prompts(tokens=self.prompt))
