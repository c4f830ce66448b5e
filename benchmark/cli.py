"""The command line, ``clvl-benchmark`` (or ``python -m benchmark``): run methods on a scenario,
rebuild tables, list what exists.

Subcommands:

* ``run``       — train and evaluate methods x seeds on a scenario, write records and tables
* ``table``     — rebuild tables and figures from existing run records (no training)
* ``show``      — print the protocol card of one run record
* ``scenarios`` — list scenarios (``--describe NAME`` builds one and prints per-task counts)
* ``methods``   — list methods (``--describe NAME`` prints one method's hyperparameters)
* ``bench``     — measure the harness's speed on this machine (``bench.json`` + ``bench.md``)

Exit status: 0 done; 2 a user mistake (unknown name, bad config, missing or corrupt data, a
results folder that cannot be written), printed as one line starting ``error:``; 3 training diverged
(NaN loss); 4 ``run --launcher ray`` finished but some runs failed (each left
``runs/<run_id>.error.json``; the others are saved); 130 / 143 stopped by Ctrl-C / SIGTERM after
saving a checkpoint (``run --resume`` continues). Anything else is a bug and keeps its traceback.

Logging goes to stderr: the harness's own messages (loggers ``benchmark`` and ``methods``) at
INFO, with ``-v`` (before or after the subcommand) at DEBUG. open_clip logs through the root
logger (module-level ``logging.info`` calls); those records are re-filed under the ``open_clip``
logger, which shows its warnings and errors, and its INFO messages only with ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import textwrap
import warnings

from .errors import BenchmarkError, RunInterrupted, one_line

log = logging.getLogger("benchmark")
DISTRIBUTION = "clvl-benchmark"
# How the console script ([project.scripts] in pyproject.toml) is called; __main__.py passes
# "python -m benchmark" instead.
PROG = "clvl-benchmark"


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None


def _workers(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"workers must be a number or auto, got {text!r}") from None


def plain(text: str) -> str:
    """``text`` without reStructuredText inline markup, for ``--help``: double and single
    back-quotes are dropped around their content, a role such as ``:func:`` or ``:class:`` is
    dropped with them, and a ``~`` target keeps only its last dotted part."""
    def role(match: re.Match) -> str:
        target = match.group(2)
        return target.rsplit(".", 1)[-1] if match.group(1) else target

    text = re.sub(r":[a-z]+(?::[a-z]+)?:`(~?)([^`]*)`", role, text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.DOTALL)
    return re.sub(r"`([^`]+)`", r"\1", text)


def version() -> str:
    """The installed distribution's version; in a checkout that is not installed (on
    PYTHONPATH), the package's ``__version__`` where it has one."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules[__package__], "__version__", "unknown (not installed)"))


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    exit_status = next(p for p in __doc__.split("\n\n") if p.startswith("Exit status"))
    parser = argparse.ArgumentParser(prog=prog, epilog=plain(exit_status),
                                     description="Run methods on a scenario, rebuild tables, list what exists.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {version()}")
    verbose_help = "log debug messages (also after the subcommand)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # The same option on every subcommand, so that `run -v` works too. SUPPRESS: a subcommand
    # that was not given -v leaves the value the main parser set alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    run = add_command(
        "run", help="train and evaluate methods on a scenario",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate methods x seeds on one scenario; write one JSON record per run into "
                    "OUTPUT_DIR/runs and the tables/figures into OUTPUT_DIR/tables and OUTPUT_DIR/figures.",
        epilog=textwrap.dedent("""\
            Precedence: defaults < --config YAML < options above < --set KEY=VALUE.
            examples:
              {prog} run --methods zeroshot,finetune --scenario synthetic
              {prog} run --config my_run.yaml --seeds 0,1,2 --set training.epochs=5
              {prog} run --methods finetune --set method_params.finetune.replay_memory=200
              {prog} run --methods mypkg.mymodule:MyMethod
              {prog} run --config my_run.yaml --resume      # continue after Ctrl-C or a crash

            A checkpoint is saved after every task (and every N steps with --checkpoint-every N); Ctrl-C or
            SIGTERM saves one and exits (130 / 143). A rerun skips finished runs (same config, code and data).\
            """).format(prog=prog))
    run.add_argument("--config", metavar="YAML", help="a YAML run configuration (see benchmark/config.py)")
    run.add_argument("--methods", type=_comma_list, metavar="M1,M2",
                     help="methods to compare: registered names or package.module:Class (default: zeroshot,finetune)")
    run.add_argument("--scenario", help="a registered scenario (default: synthetic); the scenarios command lists them")
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
    run.add_argument("--workers", type=_workers,
                     help="training data-loader workers, a number or auto (training.num_workers; default auto: "
                          "none on CPU, one per CPU core but one, at most 16, on CUDA)")
    run.add_argument("--gallery", choices=("union", "per_task"), help="protocol.gallery (default: union)")
    run.add_argument("--task-identity", dest="task_identity", choices=("inferred", "given"),
                     help="protocol.task_identity (default: inferred)")
    run.add_argument("--eval-tasks", dest="eval_tasks", choices=("seen", "all"),
                     help="protocol.tasks: evaluate seen tasks or all (all adds forward transfer; default: seen)")
    run.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config field (dotted key, YAML value); repeatable")
    run.add_argument("--force", action="store_true",
                     help="rerun runs whose record exists, and start interrupted runs over")
    run.add_argument("--resume", action="store_true",
                     help="continue interrupted runs from their last checkpoint (same config, code and data)")
    run.add_argument("--resume-anyway", dest="resume_anyway", action="store_true",
                     help="continue a run from the unfinished checkpoint it left before its data or code changed "
                          "(same method, seed and settings); the record notes what changed")
    run.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=0, metavar="N",
                     help="also checkpoint every N training steps inside a task (default 0: after each task)")
    run.add_argument("--keep-checkpoints", dest="keep_checkpoints", action="store_true",
                     help="keep a run's checkpoint after its record is written (default: deleted)")
    run.add_argument("--no-tables", dest="no_tables", action="store_true", help="do not rebuild tables at the end")
    run.add_argument("--bad-images", dest="bad_images", choices=("stop", "skip"), default="stop",
                     help="images that do not decode, found by the check before training: stop (default, every bad "
                          "file is listed) or skip their items (counted in the record)")
    run.add_argument("--no-image-check", dest="no_image_check", action="store_true",
                     help="do not decode every image before training (bad files then stop the run when met)")
    run.add_argument("--ddp", action="store_true",
                     help="split each run over the processes torchrun starts (launch: torchrun --nproc_per_node=K -m "
                          "benchmark run ... --ddp); training.batch_size stays the global batch, process 0 writes")
    run.add_argument("--logger", dest="loggers", type=_comma_list, metavar="L1,L2",
                     help="log training and recall to tensorboard, wandb and/or csv, under OUTPUT_DIR/logs/RUN_ID")
    run.add_argument("--launcher", choices=("local", "ray"), default="local",
                     help="local (default): the runs one after another here; ray: each run a Ray task, on the "
                          "cluster in RAY_ADDRESS or a local one (config section launcher; pip install "
                          "'clvl-benchmark[ray]'); see docs/scale-out.md")
    run.add_argument("--only", type=_comma_list, metavar="RUN_ID[,RUN_ID]",
                     help="run only these runs of the grid (their ids as in OUTPUT_DIR/runs); others are left alone")

    table = add_command("table", help="rebuild tables and figures from run records",
                        description="Read every run record under RESULTS_DIR (RESULTS_DIR/runs/*.json) and write "
                                    "CSV/Markdown/LaTeX tables and recall heatmaps, without rerunning anything.")
    table.add_argument("results_dir", metavar="RESULTS_DIR")
    table.add_argument("--out", help="output folder (default: RESULTS_DIR)")
    table.add_argument("--baseline", metavar="METHOD",
                       help="mark significant differences from METHOD (default: from each column's best method)")

    show = add_command("show", help="print the protocol card of a run record",
                       description="Print what a run did and under which protocol: scenario, task order and "
                                   "counts, gallery, task identity, seeds, backbone, method parameters, what "
                                   "the method was allowed to see, data checksums and code version.")
    show.add_argument("record", metavar="RECORD", help="a run record, e.g. results/runs/finetune__synthetic__seed0__*.json")

    scen = add_command("scenarios", help="list scenarios, or describe one")
    scen.add_argument("--describe", metavar="NAME", help="build the scenario and print its per-task counts")
    scen.add_argument("--config", metavar="YAML",
                      help="describe the scenario this run configuration declares (its scenario_options, data_root)")
    scen.add_argument("--data-root", dest="data_root", help="dataset folder for --describe")
    scen.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                      help="a scenario option for --describe (e.g. assign=largest); repeatable")

    meth = add_command("methods", help="list methods, or describe one")
    meth.add_argument("--describe", metavar="NAME",
                      help="print the method's hyperparameters: name, type, default and help of each field")
    bench = add_command(
        "bench", help="measure the harness's speed on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure, in one run, the backbone hooks against plain open_clip, each method's training "
                    "pairs/s (real data pipeline and in-memory), data-pipeline pairs/s per worker, key fitting and "
                    "evaluation time, checkpoint size and save time, and on CUDA the achieved TFLOP/s; write "
                    "OUTPUT_DIR/bench.json and OUTPUT_DIR/bench.md. Random weights at the model's shapes: nothing "
                    "is downloaded.",
        epilog=textwrap.dedent("""\
            examples:
              {prog} bench                                  # everything, ViT-B/16 shapes (minutes on a GPU)
              {prog} bench --methods lpi --sections training,device
              {prog} bench --tiny                           # seconds: a tiny model, a few steps (CI)\
            """).format(prog=prog))
    bench.add_argument("--tiny", action="store_true",
                       help="CI mode: the tiny clvl-tiny model, a handful of steps, three methods")
    bench.add_argument("--model", help="an open_clip architecture, built with random weights (default: ViT-B-16)")
    bench.add_argument("--methods", metavar="M1,M2", help="methods to measure (default: all built-in)")
    bench.add_argument("--sections", metavar="S1,S2",
                       help="hooks, training, data, evaluation, checkpoints, device (default: all)")
    bench.add_argument("--steps", metavar="N", help="timed training steps per method and feed (default: by device)")
    bench.add_argument("--batch-size", dest="batch_size", metavar="N",
                       help="pairs per training step and images per hook call (default: 64 on CUDA, 8 on CPU)")
    bench.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    bench.add_argument("--precision", help="bf16, fp16 or fp32 for the hooks section (default: bf16 on CUDA, "
                                           "else fp32)")
    bench.add_argument("--num-workers", dest="num_workers", metavar="N",
                       help="training loader workers of the pipeline feed (default: training.num_workers' default)")
    bench.add_argument("--eval-images", dest="eval_images", metavar="N",
                       help="N of the evaluation section's N images x 5N captions (default: by device)")
    bench.add_argument("--output-dir", dest="output_dir", help="where bench.json and bench.md go "
                                                              "(default: results/bench)")
    parser.set_defaults(prog=prog)
    return parser


def cmd_bench(args) -> int:
    from .bench import resolve_options, run_bench

    options = resolve_options(tiny=args.tiny, model=args.model, methods=args.methods, sections=args.sections,
                              steps=args.steps, batch_size=args.batch_size, device=args.device,
                              precision=args.precision, output_dir=args.output_dir, num_workers=args.num_workers,
                              eval_images=args.eval_images)
    report, json_path, md_path = run_bench(options)
    print(report["goal"]["line"])
    print(f"wrote {json_path}")
    print(f"wrote {md_path}")
    return 0


def cmd_run(args) -> int:
    from .config import build_config
    from .errors import CellsFailed, ConfigError
    from .launch import run_grid
    from .run import RunControl

    options = {"methods": args.methods, "scenario": args.scenario, "seeds": args.seeds, "backbone": args.backbone,
               "device": args.device, "output_dir": args.output_dir, "data_root": args.data_root,
               "cache_dir": args.cache_dir, "loggers": args.loggers,
               "training": {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                              ("num_workers", args.workers))
                            if v is not None},  # not `if v`: --epochs 0 must fail validation, not vanish
               "protocol": {k: v for k, v in (("gallery", args.gallery), ("task_identity", args.task_identity),
                                              ("tasks", args.eval_tasks)) if v is not None}}
    if args.ddp and args.launcher != "local":
        raise ConfigError("--ddp splits one run over the processes torchrun started and does not combine with "
                          "--launcher ray: set launcher.gpus_per_cell above 1 instead, and each Ray cell runs "
                          "under torchrun itself")
    config = build_config(args.config, options, args.assignments)
    control = RunControl(force=args.force, resume=args.resume, keep_checkpoints=args.keep_checkpoints,
                         checkpoint_every=args.checkpoint_every, resume_anyway=args.resume_anyway,
                         check_images=not args.no_image_check,
                         bad_images=args.bad_images, ddp=args.ddp, launcher=args.launcher,
                         only=frozenset(args.only) if args.only else None)
    outcome = run_grid(config, control)
    if _secondary(args):  # --ddp: process 0 reports and writes the tables
        return 0
    paths = outcome.paths
    print(f"{len(paths)} run record(s) in {os.path.join(config.output_dir, 'runs')}")
    if not args.no_tables and paths:
        _report(config.output_dir, None, prog=args.prog)
    if outcome.failures:
        raise CellsFailed(outcome.failure_message())
    return 0


def _report(results_dir: str, out: str | None, baseline: str | None = None, prog: str = PROG) -> None:
    from .errors import OutputError
    from .reporting import build_report

    try:
        written = build_report(results_dir, out, baseline=baseline)
    except OSError as error:
        raise OutputError(f"could not write the tables ({error.strerror or error}: {error.filename}); the run records "
                          f"are complete: rebuild the tables with `{prog} table {results_dir}`") from None
    for path in written:
        print(f"wrote {path}")


def cmd_table(args) -> int:
    if not os.path.isdir(args.results_dir):
        raise BenchmarkError(f"results folder {args.results_dir} does not exist")
    _report(args.results_dir, args.out, args.baseline, prog=args.prog)
    return 0


def cmd_show(args) -> int:
    from .reporting.card import protocol_card

    print(protocol_card(args.record), end="")
    return 0


def cmd_scenarios(args) -> int:
    from .config import parse_assignment, read_yaml
    from .scenarios import available_scenarios, build_scenario

    if args.describe or args.config:
        name, options, data_root = args.describe, {}, args.data_root
        if args.config:  # the scenario a run configuration declares, as the run would build it
            declared = read_yaml(args.config)
            name = name or declared.get("scenario", "synthetic")
            options = dict(declared.get("scenario_options") or {})
            data_root = data_root if data_root is not None else declared.get("data_root")
        for assignment in args.assignments:
            options.update(parse_assignment(assignment))
        scenario = build_scenario(name, options, data_root)
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
    from .method import available_methods, get_method

    if args.describe:
        describe_method(get_method(args.describe))
        return 0
    for selector, cls in sorted(available_methods().items()):
        identity = "/".join(sorted(cls.task_identity))
        # One name per method: the class's, as in records and method_params; an entry point
        # published under another name is shown as how to select it.
        selected = f"  (select as {selector!r})" if selector != cls.name else ""
        print(f"{cls.name:12s} {cls.summary}  [task identity: {identity}]  ({cls.__module__}.{cls.__qualname__})"
              f"{selected}")
    return 0


def describe_method(cls) -> None:
    """Print a method's name and summary, the first lines of its class's and its Config's
    docstrings and, per field of its Config, the name, type, default and help text (the field's
    ``metadata["help"]``)."""
    import dataclasses

    config = cls.Config
    print(f"{cls.name}: {cls.summary}" if cls.summary else cls.name)
    if cls.__doc__ and cls.__doc__.strip():  # a class's own docstring (not inherited)
        print(f"  {plain(cls.__doc__.strip().splitlines()[0])}")
    print(f"  class {cls.__module__}.{cls.__qualname__}; task identity: {'/'.join(sorted(cls.task_identity))}")
    # A dataclass without a docstring of its own gets a generated signature as __doc__: skip it.
    doc = config.__doc__ if config.__doc__ and not config.__doc__.startswith(f"{config.__name__}(") else ""
    if doc.strip():
        print(f"  {config.__name__}: {plain(doc.strip().splitlines()[0])}")
    fields = dataclasses.fields(config)
    if not fields:
        print("  (no hyperparameters)")
        return
    rows = [(f.name, _type_name(f.type), _default_text(f), _field_help(config, f.name)) for f in fields]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, kind, default, text in rows:
        print(f"  {name:{widths[0]}}  {kind:{widths[1]}}  {default:{widths[2]}}  {text}".rstrip())


def _field_help(config: type, name: str) -> str:
    """A field's help text; a subclass that only changes a default keeps its base class's help."""
    import dataclasses

    for klass in config.__mro__:
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == name and f.metadata.get("help"):
                    return f.metadata["help"]
    return ""


def _type_name(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _default_text(field) -> str:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ============================================================================ logging and warnings

HARNESS_LOGGERS = ("benchmark", "methods")
# Libraries that log through the root logger (``logging.info(...)``): their records are re-filed
# under a logger of their own name, which the command line sets like the harness's.
ROOT_LOGGING_PACKAGES = ("open_clip",)


class RootRecordsToPackageLogger(logging.Filter):
    """A filter for the root logger: a record that a module of one of ``packages`` logged on the
    root logger goes to the logger ``<package>.<module>`` instead (its level decides, and the
    line names where it came from); every other record passes unchanged."""

    def __init__(self, packages=ROOT_LOGGING_PACKAGES):
        super().__init__()
        self.folders = []
        for package in packages:
            spec = importlib.util.find_spec(package)  # finds, does not import
            if spec is not None and spec.submodule_search_locations:
                self.folders += [(os.path.join(folder, ""), package) for folder in spec.submodule_search_locations]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":
            return True
        for folder, package in self.folders:
            if record.pathname.startswith(folder):
                target = logging.getLogger(f"{package}.{record.module}")
                record.name = target.name
                if target.isEnabledFor(record.levelno):
                    target.handle(record)  # its handlers, then (propagating) the root's
                return False
        return True


def configure_logging(verbose: bool) -> None:
    """Log to stderr: harness messages at INFO (DEBUG with -v); open_clip's at WARNING (INFO with -v),
    re-filed from the root logger under ``open_clip.*``; other libraries' at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for name in HARNESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ROOT_LOGGING_PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose and root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)  # the root logger drops open_clip's INFO records before any filter sees them
    for old in [f for f in root.filters if isinstance(f, RootRecordsToPackageLogger)]:
        root.removeFilter(old)
    root.addFilter(RootRecordsToPackageLogger())


@contextlib.contextmanager
def quiet_import_warnings():
    """Hide warnings that libraries give when they are imported and that say nothing about a run:
    qpsolvers (imported by Avalanche's GEM plugin, which no method here uses) warns that no QP
    solver is installed. Only that warning, and only while a command runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning,
                                module=r"qpsolvers(\.|$)")
        yield


def _secondary(args) -> bool:
    """A ``run --ddp`` process other than torchrun's rank 0 (it keeps its messages to itself)."""
    return bool(getattr(args, "ddp", False)) and os.environ.get("RANK", "0") != "0"


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """The command line; ``prog`` is how it was called, for ``--help`` and messages."""
    args = build_parser(prog).parse_args(argv)
    configure_logging(args.verbose)
    handlers = {"run": cmd_run, "table": cmd_table, "show": cmd_show, "scenarios": cmd_scenarios,
                "methods": cmd_methods, "bench": cmd_bench}
    try:
        with quiet_import_warnings():
            return handlers[args.command](args)
    except RunInterrupted as stopped:
        if not _secondary(args):
            print(f"interrupted by {stopped}", file=sys.stderr)
        return stopped.exit_code
    except BenchmarkError as error:
        if not _secondary(args):  # under torchrun --ddp, process 0 says it, not every process
            print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted at once: finished runs are saved; an unfinished run continues from its last "
              "checkpoint with `run --resume`", file=sys.stderr)
        return 130

