"""Task semantic similarity for LPI's task contrastive constraint (§4.3).

Two sources:

* ``csv`` — a published matrix with task names as header. The default file is
  ``methods/lpi/data/coco_supercat_task_similarity.csv`` (package data read through
  :mod:`importlib.resources`, so an installed wheel has it too; ``datasets/`` keeps an identical
  copy for readers of the repository): the 12 x 12 matrix LPI ships for its COCO supercategory
  sessions (Kelvin-ywc/LPI ``retrieval/MID/task_sim_matrix.txt`` @ 92e5800; cosine
  similarities of OpenAI ``text-embedding-3-large`` embeddings of the supercategory names).
* ``text`` — for any other scenario: cosine similarity of the backbone's own (prompt-free,
  frozen) text features of the task names. The method only learns a task's name when the task
  starts, so the matrix is filled as tasks arrive; the constraint only ever needs tasks 0..t.

``auto`` takes the CSV when every task seen so far is named in it, and the text encoder otherwise.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCES = ("auto", "csv", "text")
# Package data of ``methods.lpi`` (declared in pyproject's [tool.setuptools.package-data]).
SHIPPED_CSV = resources.files(__package__).joinpath("data", "coco_supercat_task_similarity.csv")


def read_similarity_csv(path) -> dict[str, dict[str, float]]:
    """``{row task: {column task: similarity}}`` from a CSV with a ``task`` header row; lines
    starting with ``#`` are comments. Names are lower-cased."""
    if isinstance(path, (str, bytes)) or not hasattr(path, "read_text"):
        path = Path(path)  # else already a Path or an importlib.resources Traversable
    if not path.is_file():
        raise FileNotFoundError(f"task-similarity file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    rows = list(csv.reader(lines))
    header = [name.strip().lower() for name in rows[0][1:]]
    table = {}
    for row in rows[1:]:
        if len(row) != len(header) + 1:
            raise ValueError(f"{path}: row {row[0]!r} has {len(row) - 1} values, the header names {len(header)} tasks")
        table[row[0].strip().lower()] = {name: float(value) for name, value in zip(header, row[1:])}
    if set(table) != set(header):
        raise ValueError(f"{path}: the row names and the header differ")
    return table


def csv_block(table: dict[str, dict[str, float]], names: list[str]) -> Tensor:
    """The ``[n, n]`` similarity block of ``names`` (all must be in ``table``)."""
    keys = [name.strip().lower() for name in names]
    return torch.tensor([[table[a][b] for b in keys] for a in keys], dtype=torch.float32)


def covers(table: dict[str, dict[str, float]], names: list[str]) -> bool:
    return all(name.strip().lower() in table for name in names)


@torch.no_grad()
def name_features(backbone, name: str) -> Tensor:
    """The frozen backbone's normalised text feature of a task name (``_``/``-`` read as spaces)."""
    device = next(backbone.parameters()).device
    text = name.replace("_", " ").replace("-", " ")
    return backbone.encode_text(backbone.tokenize([text]).to(device)).float()[0]


def cosine_block(features: Tensor) -> Tensor:
    """``[n, n]`` cosine similarities of ``features`` ``[n, E]``."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.T
