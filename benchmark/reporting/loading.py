"""Which records a report is made of: every valid record of a results folder, the newest per seed."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from benchmark import record as run_record
from benchmark.errors import BenchmarkError
from benchmark.record import RunRecord

# One logger for the whole package: the name users see in warnings stays benchmark.reporting.
logger = logging.getLogger("benchmark.reporting")


@dataclass
class LoadedRecords:
    """The valid records of a results folder plus one warning per file that was skipped."""

    records: list[RunRecord]
    warnings: list[str]
    source: Path

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def load_records(results_dir: str | os.PathLike[str]) -> LoadedRecords:
    """Read every run record in ``results_dir/runs/`` (or in ``results_dir`` itself).

    Files that are not valid JSON, are not run records, or are malformed are skipped with
    a one-line warning in :attr:`LoadedRecords.warnings`: one bad file must not hide the
    results of all the others. Raises :class:`BenchmarkError` when nothing valid is left.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise BenchmarkError(f"results folder {root} does not exist; run `python -m benchmark run ...` first")
    folder = root / "runs" if (root / "runs").is_dir() else root

    records: list[RunRecord] = []
    warnings: list[str] = []
    for path in run_record.record_files(folder):  # not runs/*.error.json (a failed run, benchmark.launch)
        try:
            records.append(run_record.load(path))
        except run_record.RecordError as why:
            warnings.append(f"skipped {path}: {why.reason}")
    records = drop_superseded(records, warnings)
    for record in records:
        if record.recall_tie_rule != run_record.TIE_RULE:
            # Written before ties counted as expected recall: its recall gave tied items to the query.
            warnings.append(f"{record.path}: recall computed with the old optimistic tie rule (the record has no "
                            "recall_tie_rule 'expected'); it is shown, but rerun it with --force to compare it "
                            "with newer records")

    if not records:
        raise BenchmarkError(f"no run records found in {folder}; run `python -m benchmark run ...` first")
    return LoadedRecords(records=records, warnings=warnings, source=folder)


def drop_superseded(records: list[RunRecord], warnings: list[str]) -> list[RunRecord]:
    """Keep one record per (scenario, protocol, method, seed): the newest.

    Two records for the same seed (a rerun after a fix, a changed hyperparameter) would
    otherwise be averaged as if they were two seeds, silently shrinking the std.
    """
    by_key: dict[tuple[str, str, str, int], list[RunRecord]] = {}
    for record in records:
        by_key.setdefault((record.scenario, record.protocol_label, record.method, record.seed), []).append(record)
    kept: list[RunRecord] = []
    for group in by_key.values():
        # Newest last; records without a usable timestamp count as oldest. Ties: file name.
        group.sort(key=lambda r: (_timestamp(r.created), r.path.name))
        newest = group[-1]
        kept.append(newest)
        for older in group[:-1]:
            warnings.append(
                f"skipped {older.path}: same method, scenario, protocol and seed as the newer {newest.path.name}"
            )
    return kept


def _timestamp(created: str | None) -> float:
    if created is None:
        return -math.inf
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return -math.inf
    # A naive timestamp is read as local time: good enough to order reruns on one machine.
    return moment.timestamp()


def as_records(records: LoadedRecords | Iterable[RunRecord]) -> list[RunRecord]:
    return list(records.records if isinstance(records, LoadedRecords) else records)


def by_scenario_and_protocol(records: list[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    """``{scenario: {protocol label: records}}``, each group sorted by method and seed: one table each."""
    groups: dict[str, dict[str, list[RunRecord]]] = {}
    for record in sorted(records, key=lambda r: (r.scenario, r.protocol_label, r.method, r.seed)):
        groups.setdefault(record.scenario, {}).setdefault(record.protocol_label, []).append(record)
    return groups
