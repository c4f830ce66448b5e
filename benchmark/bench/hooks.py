"""Backbone hook overhead: the harness's prompt-aware encoders against open_clip's own.

:class:`~benchmark.backbone.ClipBackbone` re-runs open_clip's towers block by block so that
prompts can enter (:mod:`benchmark.backbone.adapter`). This section times, per tower (image,
text) and per pass (``forward``; ``forward+backward``):

* ``open_clip`` — the model's own ``encode_image`` / ``encode_text``;
* ``hooks, none`` — the adapter without prompts (same math: the claim to keep is 0.99-1.01x);
* ``hooks, none, cut`` (text only) — the same with the captions cut to the batch's longest
  (``ClipBackbone.trim_tokens``, what runs train and evaluate with): the FLOP ratio below 1 is
  the saving. Every other text row runs all positions (``cut_text`` off), like open_clip;
* ``hooks, tokens`` / ``deep`` / ``prefix`` — one of each prompt kind
  (:class:`~benchmark.backbone.Prompts`): 16 input tokens; 16 input tokens plus a deep prompt
  added before every later block (LPI's layout); key/value prefixes of length 5 in blocks 0-4
  (DualPrompt's).

Prompts add tokens, so a prompted row does more arithmetic than open_clip; its FLOP ratio
(counted with :func:`~benchmark.bench.device.count_flops`) is reported beside its time ratio, and
``overhead`` = time ratio / FLOP ratio is what the hook path costs beyond the extra math.

The backward pass is activation-only, as in prompt tuning: the backbone stays frozen and the
gradient flows to the prompts, or, with no prompts, to the positional embedding (a leaf that
both paths add at the input, so the whole tower is differentiated through).
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from ..backbone import ClipBackbone, Prompts
from ..precision import autocast
from .device import count_flops
from .timing import interleaved, ratio

PROMPT_TOKENS = 16
PREFIX_LENGTH = 5
PREFIX_BLOCKS = 5
KINDS = ("none", "tokens", "deep", "prefix")


def make_prompts(kind: str, blocks: int, width: int, device: torch.device, requires_grad: bool) -> Prompts | None:
    """One prompt of ``kind`` for an encoder of ``blocks`` blocks and ``width`` channels."""
    def leaf(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * 0.02).requires_grad_(requires_grad)

    if kind == "none":
        return None
    if kind == "tokens":
        return Prompts(tokens=leaf(1, PROMPT_TOKENS, width))
    if kind == "deep":
        return Prompts(tokens=leaf(1, PROMPT_TOKENS, width),
                       deep={layer: leaf(1, PROMPT_TOKENS, width) for layer in range(1, blocks)})
    if kind == "prefix":
        return Prompts(prefix={layer: (leaf(1, PREFIX_LENGTH, width), leaf(1, PREFIX_LENGTH, width))
                               for layer in range(min(PREFIX_BLOCKS, blocks))})
    raise ValueError(f"unknown prompt kind {kind!r}")


def sample_tokens(backbone: ClipBackbone, batch: int, seed: int = 0) -> torch.Tensor:
    from .data import captions_for

    captions = [caps[0] for caps in captions_for(batch, seed)]
    random.Random(seed).shuffle(captions)
    return backbone.tokenize(captions)


def _variants(backbone: ClipBackbone, tower: str, inputs: torch.Tensor, backward: bool, device: torch.device,
              precision: str) -> dict[str, Callable[[], object]]:
    """Callables for each variant of one tower and pass."""
    model = backbone.model
    if tower == "image":
        plain, hooked = model.encode_image, backbone.encode_image
        blocks, width, positions = len(backbone.vision_blocks), backbone.vision_width, model.visual.positional_embedding
    else:
        plain, hooked = model.encode_text, backbone.encode_text
        blocks, width, positions = len(backbone.text_blocks), backbone.text_width, model.positional_embedding

    def run(encode: Callable[[], torch.Tensor], leaves: list[torch.Tensor], cut: bool = False) -> Callable[[], object]:
        def call():
            backbone.cut_text = cut  # off: the text tower runs every position, as open_clip does
            if not backward:
                with torch.no_grad(), autocast(device, precision):
                    return encode()
            with autocast(device, precision):
                out = encode()
            # Float32 sum: a scalar to differentiate, whatever the autocast dtype.
            torch.autograd.backward(out.float().sum(), inputs=leaves)
            for leaf in leaves:
                leaf.grad = None
        return call

    variants = {"open_clip": run(lambda: plain(inputs), [positions])}
    if tower == "text":  # cut on the host, before the ids reach the device (as the training collate does)
        cut_inputs = backbone.trim_tokens(inputs.cpu()).to(inputs.device)
        variants["hooks, none, cut"] = run(lambda: hooked(cut_inputs), [positions], cut=True)
    for kind in KINDS:
        prompts = make_prompts(kind, blocks, width, device, requires_grad=backward)
        if prompts is None:
            variants[f"hooks, {kind}"] = run(lambda: hooked(inputs), [positions])
        else:
            leaves = ([prompts.tokens] if prompts.tokens is not None else []) + list(prompts.deep.values()) + \
                     [t for pair in prompts.prefix.values() for t in pair]
            variants[f"hooks, {kind}"] = run(lambda p=prompts: hooked(inputs, p), leaves)
    return variants


def measure_hooks(options, backbone: ClipBackbone, tick: Callable[[], None]) -> dict:
    """The hooks section (see the module docstring)."""
    device, profile = options.device, options.profile
    batch = options.batch_size
    backbone.eval()
    size = backbone.image_size
    images = torch.randn(batch, 3, size[0], size[1], generator=torch.Generator().manual_seed(0)).to(device)
    tokens = sample_tokens(backbone, batch).to(device)
    positions = [backbone.model.visual.positional_embedding, backbone.model.positional_embedding]
    flags = [p.requires_grad for p in positions]
    cut_text = backbone.cut_text
    rows = []
    try:
        for p in positions:  # the backward's leaf when there are no prompts (see the module docstring)
            p.requires_grad_(True)
        for tower, inputs in (("image", images), ("text", tokens)):
            flops = {name: count_flops(fn) for name, fn in
                     _variants(backbone, tower, inputs, False, device, options.precision).items()}
            for backward in (False, True):
                variants = _variants(backbone, tower, inputs, backward, device, options.precision)
                timings = interleaved(variants, device, warmup=profile["hook_warmup"],
                                      repeats=profile["hook_repeats"], number=profile["hook_number"], tick=tick)
                base = timings["open_clip"].median_s
                for name, timing in timings.items():
                    time_ratio = ratio(timing.median_s, base)
                    flop_ratio = ratio(flops[name], flops["open_clip"])
                    rows.append({"tower": tower, "pass": "forward+backward" if backward else "forward",
                                 "variant": name, "batch": batch, "ms_per_call": 1e3 * timing.median_s,
                                 "repeats_ms": [1e3 * t for t in timing.repeats_s],
                                 "forward_gflop": flops[name] / 1e9, "time_ratio": time_ratio,
                                 "flop_ratio": flop_ratio, "overhead": ratio(time_ratio, flop_ratio)})
    finally:
        backbone.cut_text = cut_text
        for p, flag in zip(positions, flags):
            p.requires_grad_(flag)
            p.grad = None
    return {"status": "measured", "model": options.model, "precision": options.precision, "rows": rows,
            "definition": "time_ratio = ms_per_call / open_clip's ms_per_call (same tower, pass and run); "
                          "flop_ratio likewise for the forward FLOPs; overhead = time_ratio / flop_ratio",
            "prompt_sizes": {"tokens": PROMPT_TOKENS, "deep": f"{PROMPT_TOKENS} tokens + every later block",
                             "prefix": f"length {PREFIX_LENGTH}, blocks 0-{PREFIX_BLOCKS - 1}"}}


def hook_steps(options) -> int:
    """Timed repeats this section makes (for the progress bar)."""
    return 2 * 2 * (1 + len(KINDS)) * options.profile["hook_repeats"]
