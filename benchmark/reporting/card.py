"""The protocol card of one run record (``python -m benchmark show RECORD``): what was run, under
which protocol, what the method could see, and where the result came from."""

from __future__ import annotations

import math
import os
from pathlib import Path

from benchmark import record as run_record
from benchmark.record import RunRecord

_GALLERY = {"union": "union: each query is ranked against the test items of every evaluated task together",
            "per_task": "per_task: each query is ranked against its own task's test items only"}
_IDENTITY = {"inferred": "inferred: no task label at test time; the method picks the task itself",
             "given": "given: every test query comes with its true task label"}
_TASKS = {"seen": "seen: after session t, the tasks trained so far",
          "all": "all: after every session, every task (gives forward transfer; recall before training recorded)"}


def protocol_card(path: str | os.PathLike[str]) -> str:
    """The card as text; raises :class:`benchmark.record.RecordError` (a BenchmarkError) when
    ``path`` is missing, unreadable or not a record of this harness."""
    path = Path(path)
    record = run_record.load(path, strict=False)  # a card for any record of this harness, even an old one

    config = record.config
    protocol = record.protocol
    lines: list[str] = []
    add = lines.append

    def section(title: str) -> None:
        add("")
        add(title)

    add(f"Run {record.run_id}  ({path})")
    add(f"  created {record.created}; config hash {str(record.config_hash)[:16]}")

    section("Scenario")
    options = record.scenario_info.get("options")
    add(f"  {record.scenario}: {len(record.tasks)} tasks" + (f"; options {options}" if options else ""))
    add("  task order (train images / captions, test images / captions):")
    counts = {c.get("task"): c for c in record.task_counts}
    for number, task in enumerate(record.tasks, start=1):
        c = counts.get(task, {})
        add(f"    {number:2d}. {task:<20s} {c.get('train_images', '?')} / {c.get('train_captions', '?')}   "
            f"{c.get('test_images', '?')} / {c.get('test_captions', '?')}")
    info = record.scenario_info
    split = info.get("split")
    if isinstance(split, dict):
        add(f"  split by the harness: test {split.get('test')} per task, by image, seed {split.get('seed')}")
    bad = info.get("bad_images")
    if isinstance(bad, dict):
        skipped = sum(n.get("train", 0) + n.get("test", 0) for n in (bad.get("skipped_items") or {}).values())
        add(f"  left out: {skipped} item(s) whose image does not decode ({len(bad.get('files') or [])} file(s))")
    if isinstance(info.get("dropped_tasks"), dict):
        add(f"  not used (left out of task_order): {', '.join(info['dropped_tasks'])}")
    if isinstance(info.get("train_test_overlap"), dict):
        add("  test images also trained on: " + ", ".join(f"{n} in {t}" for t, n in info["train_test_overlap"].items()))

    section("Protocol")
    add(f"  gallery          {_GALLERY.get(protocol.get('gallery'), protocol.get('gallery'))}")
    add(f"  task identity    {_IDENTITY.get(protocol.get('task_identity'), protocol.get('task_identity'))}")
    add(f"  tasks evaluated  {_TASKS.get(protocol.get('tasks'), protocol.get('tasks'))}")
    add(f"  seeds            {_seeds_phrase(record, path)}")

    section("Model")
    default = (options or {}).get("backbone") if isinstance(options, dict) else None
    add(f"  backbone         {config.get('backbone')}"
        + (f"  (the scenario's default, {default}, was not used)" if default and default != config.get("backbone") else ""))
    for entry in (record.provenance.get("backbone_weights") or {}).get("files", []):
        add(f"    weights {entry.get('name')}  sha256 {str(entry.get('sha256'))[:16]}")
    params = next(iter((config.get("method_params") or {}).values()), {})
    add(f"  method           {record.method}" + (f" ({', '.join(config.get('methods') or [])})"
                                                  if config.get("methods") != [record.method] else ""))
    adjusted = record.method_adjusted
    for key, value in params.items():
        change = adjusted.get(key)
        add(f"    {key} = {value}" + (f"  -> ran with {change.get('used')} ({change.get('why')})" if change else ""))
    training = config.get("training") or {}
    if params.get("lr_scaling") == "linear_256" and isinstance(training.get("batch_size"), int):
        # Methods that follow the official linear rule run at lr * batch / 256 (methods.common.training).
        add(f"    effective lr = lr * batch_size / 256 = {params.get('lr')} * {training['batch_size']} / 256 "
            f"= {params.get('lr') * training['batch_size'] / 256:g}")
    add("  training         " + ", ".join(f"{k} {v}" for k, v in training.items()))

    section("What the method was allowed to see")
    access = record.access
    if access is not None:
        if access.current_task_training_data:
            add("  while training task t: task t's training pairs, each with its task label")
        else:
            add("  training: none (the method never trains)")
        if access.replay_memory:
            for memory in access.replay_memory:
                add(f"  earlier tasks' data: a replay memory of {memory.mem_size} image-caption pairs "
                    f"({memory.plugin})")
        else:
            add("  earlier tasks' data: none (no replay memory)")
        identity = (access.task_identity_at_test if access.task_identity_at_test is not None
                    else protocol.get("task_identity"))
        add("  at test time: " + ("the true task label of every query" if identity == "given"
                                  else "no task label (the method must infer the task, or not need it)"))
        if access.plugins:
            add(f"  plugins: {', '.join(access.plugins)}")
    else:
        add("  (not recorded by the harness version that wrote this record)")
    truncated = record.captions_truncated
    if truncated is not None:
        add(f"  captions longer than the {truncated.context_length}-token context (truncated): {truncated.total}")

    section("Data")
    prov = record.provenance
    manifest = prov.get("data_manifest") or {}
    if manifest.get("generator_version") is not None:
        add(f"  drawn by the synthetic generator, version {manifest['generator_version']}")
    for entry in manifest.get("files") or []:
        add(f"  {entry.get('path')}  {entry.get('size')} bytes  sha256 {str(entry.get('sha256'))[:16]}")
    if not manifest:
        add("  (no data manifest in this record)")

    section("Code and machine")
    code = prov.get("code") or {}
    git = code.get("git") or prov.get("git") or {}
    dirty = {True: " (uncommitted changes)", False: "", None: ""}.get(git.get("dirty"), "")
    add(f"  git commit       {git.get('commit') or 'unknown'}{dirty}")
    if code:
        add(f"  harness sha256   {str(code.get('harness_sha256'))[:16]}; method sha256 {str(code.get('method_sha256'))[:16]}")
    versions = prov.get("versions") or {}
    add("  versions         " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    add(f"  host             {prov.get('host')}; {prov.get('platform')}")
    add(f"  device           {prov.get('device')} ({prov.get('device_name')}); torch threads "
        f"{prov.get('torch_threads')}; deterministic algorithms {prov.get('deterministic_algorithms', 'unknown')}")
    wall = record.costs.wall_time_s if record.costs is not None and record.costs.wall_time_s is not None else 0
    resumed = record.resumed
    add(f"  wall time        {wall:.1f} s" +
        (f"; resumed {len(resumed)} time(s): " + "; ".join(_resumed(r) for r in resumed) if resumed else ""))

    section("Final session (R@1, %)")
    for direction in ("i2t", "t2i"):
        matrix = record.recall.get(direction, {}).get(1)
        if matrix is not None and len(matrix):
            last = [float(v) for v in matrix[-1]]
            values = [v for v in last if not math.isnan(v)]
            final = f"{sum(values) / len(values):.1f}" if values else "-"
            per_task = " ".join("-" if math.isnan(v) else f"{v:.1f}" for v in last)
            add(f"  {direction}  final average {final}   per task {per_task}")
    return "\n".join(lines) + "\n"


def _seeds_phrase(record: RunRecord, path: Path) -> str:
    """This record's seed, and those of its siblings with the same configuration otherwise."""
    def setup(r: RunRecord) -> tuple:
        config = dict(r.config)
        for key in ("seeds", "output_dir", "force"):
            config.pop(key, None)
        return r.method, r.scenario, dict(r.protocol), tuple(r.tasks), config

    mine = setup(record)
    seeds = {record.seed}
    for sibling in run_record.record_files(path.parent):
        if sibling.resolve() == path.resolve():
            continue
        try:
            other = run_record.load(sibling, strict=False)
        except run_record.RecordError:
            continue
        if setup(other) == mine:
            seeds.add(other.seed)
    listed = ", ".join(str(s) for s in sorted(seeds, key=str))
    if len(seeds) == 1:
        return f"{record.seed} (one record per seed; no other seed of this configuration next to it)"
    return f"{record.seed} in this record; this configuration was run with seeds {listed} in {path.parent}"


def _resumed(entry) -> str:
    """One resume, in words; a --resume-anyway one says whose checkpoint and what had changed."""
    anyway = entry.get("anyway")
    if isinstance(anyway, dict):
        return (f"{entry.get('from', '?')} of {anyway.get('checkpoint_of')} (--resume-anyway; changed "
                f"{anyway.get('changed')})")
    return str(entry.get("from", "?"))
