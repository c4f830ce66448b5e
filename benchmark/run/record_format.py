"""How a run record writes what it holds: its schema tag and the compact per-query ranks.

One unit on purpose: :mod:`benchmark.run.loop` builds the record with these, and a record module
of its own may take their place whole.
"""

from __future__ import annotations

import hashlib

import torch

from ..scenarios import Scenario

RECORD_SCHEMA = "clvl-benchmark/run-record/v1"
# Per-query ranks are stored one character each: "0".."9" for ranks 0..9, "x" for 10 or worse.
# Enough for recall at K <= 10 (KS), and 25k queries cost 25 kB.
RANK_CHARS = "0123456789"
RANK_BEYOND = "x"


def encode_ranks(ranks: torch.Tensor) -> str:
    return "".join(RANK_CHARS[r] if r < len(RANK_CHARS) else RANK_BEYOND for r in ranks.tolist())


def encode_ties(columns: torch.Tensor) -> list[list[int]]:
    """``[query, tied, tied_true]`` for each query (rows of ``columns`` = above, tied, tied_true)
    whose ties can change a hit at K <= 10; healthy features have none, so the list is short."""
    relevant = (columns[:, 1] > 0) & (columns[:, 0] < len(RANK_CHARS))
    index = torch.nonzero(relevant).flatten()
    return [[int(q), int(columns[q, 1]), int(columns[q, 2])] for q in index.tolist()]


def query_set_digest(scenario: Scenario) -> str:
    """Identifies the test queries (images and captions of every task, in order): two records
    can be paired query by query only when their digests are equal."""
    sha = hashlib.sha256()
    for name, test in zip(scenario.task_names, scenario.test):
        sha.update(f"task\0{name}\0".encode())
        for item in test:
            sha.update(f"{item.image_id}\0{len(item.captions)}\0".encode())
            for caption in item.captions:
                sha.update(caption.encode() + b"\0")
    return sha.hexdigest()
