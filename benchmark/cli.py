"""``python -m benchmark``: run methods on a scenario, rebuild tables, list what exists.

Subcommands:

* ``run``       — train and evaluate methods x seeds on a scenario, write records and tables
* ``table``     — rebuild tables and figures from existing run records (no training)
* ``show``      — print the protocol card of one run record
* ``scenarios`` — list scenarios (``--describe NAME`` builds one and prints per-task counts)
* ``methods``   — list methods

Exit status: 0 done; 2 a user mistake (unknown name, bad config, missing or corrupt data, a
results folder that cannot be written), printed as one ``error:`` line; 3 training diverged
(NaN loss); 130 / 143 stopped by Ctrl-C / SIGTERM after saving a checkpoint (``run --resume``
continues). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

from .errors import BenchmarkError, RunInterrupted, one_line

log = logging.getLogger("benchmark")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="train and evaluate methods on a scenario",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate methods x seeds on one scenario; write one JSON record per run into "
                    "OUTPUT_DIR/runs and the tables/figures into OUTPUT_DIR/tables and OUTPUT_DIR/figures.",
        epilog=textwrap.dedent("""\
            Precedence: defaults < --config YAML < options above < --set KEY=VALUE.
            examples:
              python -m benchmark run --methods zeroshot,finetune --scenario synthetic
              python -m benchmark run --config my_run.yaml --seeds 0,1,2 --set training.epochs=5
              python -m benchmark run --methods finetune --set method_params.finetune.replay_memory=200
              python -m benchmark run --methods mypkg.mymodule:MyMethod
              python -m benchmark run --config my_run.yaml --resume      # continue after Ctrl-C or a crash

            A checkpoint is saved after every task (and every N steps with --checkpoint-every N); Ctrl-C or
            SIGTERM saves one and exits (130 / 143). A rerun skips finished runs (same config, code and data)."""))
    run.add_argument("--config", metavar="YAML", help="a YAML run configuration (see benchmark/config.py)")
    run.add_argument("--methods", type=_comma_list, metavar="M1,M2",
                     help="methods to compare: registered names or package.module:Class (default: zeroshot,finetune)")
    run.add_argument("--scenario", help="a registered scenario (default: synthetic); see `scenarios`")
    run.add_argument("--seeds", type=_seed_list, metavar="S1,S2", help="random seeds, one run each (default: 0)")
    run.add_argument("--backbone", help="e.g. ViT-B-16:openai, ARCH:/path/weights.bin, local-dir:/path "
                                        "(default: the scenario's)")
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--output-dir", dest="output_dir", help="where records and tables go (default: results)")
    run.add_argument("--data-root", dest="data_root",
                     help="dataset folder (default: $CLVL_DATA_ROOT, else ./data); see datasets/README.md")
    run.add_argument("--cache-dir", dest="cache_dir",
                     help="cache for pretrained tiny backbones (default: $CLVL_CACHE or ~/.cache/clvl-benchmark)")
    run.add_argument("--epochs", type=int, help="training epochs per task (training.epochs)")
    run.add_argument("--batch-size", dest="batch_size", type=int, help="training batch size (training.batch_size)")
    run.add_argument("--gallery", choices=("union", "per_task"), help="protocol.gallery (default: union)")
    run.add_argument("--task-identity", dest="task_identity", choices=("inferred", "given"),
                     help="protocol.task_identity (default: inferred)")
    run.add_argument("--eval-tasks", dest="eval_tasks", choices=("seen", "all"),
                     help="protocol.tasks: evaluate seen tasks or all (all adds forward transfer; default: seen)")
    run.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config field (dotted key, YAML value); repeatable")
    run.add_argument("--force", action="store_true", default=None,
                     help="rerun runs whose record exists, and start interrupted runs over")
    run.add_argument("--resume", action="store_true",
                     help="continue interrupted runs from their last checkpoint (same config, code and data)")
    run.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=0, metavar="N",
                     help="also checkpoint every N training steps inside a task (default 0: after each task)")
    run.add_argument("--keep-checkpoints", dest="keep_checkpoints", action="store_true",
                     help="keep a run's checkpoint after its record is written (default: deleted)")
    run.add_argument("--no-tables", dest="no_tables", action="store_true", help="do not rebuild tables at the end")
    run.add_argument("--logger", dest="loggers", type=_comma_list, metavar="L1,L2",
                     help="log training and recall to tensorboard, wandb and/or csv, under OUTPUT_DIR/logs/RUN_ID")

    table = sub.add_parser("table", help="rebuild tables and figures from run records",
                           description="Read every run record under RESULTS_DIR (RESULTS_DIR/runs/*.json) and write "
                                       "CSV/Markdown/LaTeX tables and recall heatmaps, without rerunning anything.")
    table.add_argument("results_dir", metavar="RESULTS_DIR")
    table.add_argument("--out", help="output folder (default: RESULTS_DIR)")
    table.add_argument("--baseline", metavar="METHOD",
                       help="mark significant differences from METHOD (default: from each column's best method)")

    show = sub.add_parser("show", help="print the protocol card of a run record",
                          description="Print what a run did and under which protocol: scenario, task order and "
                                      "counts, gallery, task identity, seeds, backbone, method parameters, what "
                                      "the method was allowed to see, data checksums and code version.")
    show.add_argument("record", metavar="RECORD", help="a run record, e.g. results/runs/finetune__synthetic__seed0__*.json")

    scen = sub.add_parser("scenarios", help="list scenarios, or describe one")
    scen.add_argument("--describe", metavar="NAME", help="build the scenario and print its per-task counts")
    scen.add_argument("--data-root", dest="data_root", help="dataset folder for --describe")
    scen.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                      help="a scenario option for --describe (e.g. assign=largest); repeatable")

    sub.add_parser("methods", help="list methods")
    return parser


def cmd_run(args) -> int:
    from .config import build_config
    from .runner import RunControl, run_all

    options = {"methods": args.methods, "scenario": args.scenario, "seeds": args.seeds, "backbone": args.backbone,
               "device": args.device, "output_dir": args.output_dir, "data_root": args.data_root,
               "cache_dir": args.cache_dir, "force": args.force, "loggers": args.loggers,
               "training": {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size))
                            if v is not None},  # not `if v`: --epochs 0 must fail validation, not vanish
               "protocol": {k: v for k, v in (("gallery", args.gallery), ("task_identity", args.task_identity),
                                              ("tasks", args.eval_tasks)) if v is not None}}
    config = build_config(args.config, options, args.assignments)
    control = RunControl(resume=args.resume, keep_checkpoints=args.keep_checkpoints,
                         checkpoint_every=args.checkpoint_every)
    paths = run_all(config, control)
    print(f"{len(paths)} run record(s) in {os.path.join(config.output_dir, 'runs')}")
    if not args.no_tables:
        _report(config.output_dir, None)
    return 0


def _report(results_dir: str, out: str | None, baseline: str | None = None) -> None:
    from .errors import OutputError
    from .reporting import build_report

    try:
        written = build_report(results_dir, out, baseline=baseline)
    except OSError as error:
        raise OutputError(f"could not write the tables ({error.strerror or error}: {error.filename}); the run records "
                          f"are complete: rebuild the tables with `python -m benchmark table {results_dir}`") from None
    for path in written:
        print(f"wrote {path}")


def cmd_table(args) -> int:
    if not os.path.isdir(args.results_dir):
        raise BenchmarkError(f"results folder {args.results_dir} does not exist")
    _report(args.results_dir, args.out, args.baseline)
    return 0


def cmd_show(args) -> int:
    from .provenance import protocol_card

    print(protocol_card(args.record), end="")
    return 0


def cmd_scenarios(args) -> int:
    from .config import parse_assignment
    from .scenarios import available_scenarios, build_scenario

    if args.describe:
        options: dict = {}
        for assignment in args.assignments:
            options.update(parse_assignment(assignment))
        scenario = build_scenario(args.describe, options, args.data_root)
        import pandas as pd

        frame = pd.DataFrame(scenario.counts())
        print(f"{scenario.name}: {scenario.num_tasks} tasks, default backbone {scenario.default_backbone}")
        for key, value in scenario.info.items():
            print(f"  {key}: {value}")
        print(frame.to_string(index=False))
        return 0
    for name, builder in sorted(available_scenarios().items()):
        tasks = builder.num_tasks if builder.num_tasks is not None else "any"
        print(f"{name:15s} tasks: {tasks!s:4s} {builder.summary}")
        print(f"{'':15s} needs: {builder.needs}")
    return 0


def cmd_methods(args) -> int:
    from methods import available_methods

    for name, cls in sorted(available_methods().items()):
        identity = "/".join(sorted(cls.task_identity))
        print(f"{name:12s} {cls.summary}  [task identity: {identity}]  ({cls.__module__}.{cls.__qualname__})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handlers = {"run": cmd_run, "table": cmd_table, "show": cmd_show, "scenarios": cmd_scenarios,
                "methods": cmd_methods}
    try:
        return handlers[args.command](args)
    except RunInterrupted as stopped:
        print(f"interrupted by {stopped}", file=sys.stderr)
        return stopped.exit_code
    except BenchmarkError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted at once: finished runs are saved; an unfinished run continues from its last "
              "checkpoint with `run --resume`", file=sys.stderr)
        return 130

