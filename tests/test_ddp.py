"""One run split over processes (``torchrun ... run --ddp``, :mod:`benchmark.distributed`) computes
what one process computes.

Two processes on the CPU (gloo, loopback only), started by ``python -m torch.distributed.run``:

* one training step's gradients on the same global batch equal the single-process gradients
  (this file, run as torchrun's script, is the worker), for ``finetune`` and ``sprompts``, with
  a batch that splits evenly and one that does not;
* a whole tiny run (two tasks, two epochs, a last batch that splits 2 + 1, test galleries that
  shard unevenly) ends with the single-process run's recall matrices and method state;
* a method that cannot run split is refused before training, with one error line;
* ``--ddp`` without torchrun is a one-line error saying how to launch.

The runs use the methods with a deterministic training transform (the backbone's evaluation
transform): a random crop is drawn from each process's own RNG, so with it a split run is a
different (equally valid) draw of the augmentations, not the single-process one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmark import distributed
from benchmark.losses import info_nce, info_nce_share
from benchmark.run.planning import RunControl, check_split
from helpers import error_line, run_main
from methods.finetune import Finetune
from methods.sprompts import SPrompts

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# Tolerances (float32 on the CPU; the split sums the same terms in another order).
GRADIENT_RTOL = 1e-5  # max |Δ grad| relative to the largest single-process gradient entry
STATE_ATOL = 1e-5  # max |Δ| of any trained tensor after the whole run


class SteadyFinetune(Finetune):
    """``finetune`` with plain SGD (and open_clip's random training crops, seeded per item, so
    each process draws what the single process draws for its pairs): AdamW
    divides by the root of the squared gradients, so for entries whose gradient is near zero it
    turns float32 rounding noise into steps of size ``lr``; SGD's steps are linear in the
    gradient, so a wrong batch would show and rounding would not."""

    name = "finetune_steady"

    def configure_optimizer(self, params, epochs, steps_per_epoch):
        return torch.optim.SGD(params, lr=self.config.lr), None


class SteadySPrompts(SPrompts):
    """``sprompts`` as it is (random training crops; its keys fitted by process 0 and copied)."""

    name = "sprompts_steady"


TINY = ["--backbone", "clvl-tiny", "--device", "cpu", "--epochs", "2", "--batch-size", "4",
        "--set", "scenario_options.train_images=5", "--set", "scenario_options.test_images=5",
        "--set", "scenario_options.captions_per_image=3", "--set", "scenario_options.tasks=[colours,backdrops]",
        "--no-tables", "--keep-checkpoints"]
STEADY = ["--methods", "test_ddp:SteadyFinetune,test_ddp:SteadySPrompts,zeroshot",
          "--set", "method_params.finetune_steady.lr=0.05"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=2`` on the loopback interface."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the data order (no processes needed) ------------------------------------------------------
@pytest.mark.parametrize("num_items,batch_size,world,drop_last", [(15, 4, 2, False), (16, 8, 2, False),
                                                                  (13, 6, 3, True), (14, 6, 3, False)])
def test_the_ranks_batches_make_up_the_single_process_batches(num_items, batch_size, world, drop_last):
    """Union of the processes' k-th batches = the single-process training loader's k-th batch
    (benchmark.data.loading.train_loader, whose order is seeded by run seed, task and epoch),
    for several epochs, without touching the global RNG; each key keeps its (task, epoch) tag,
    so every item's augmentation is seeded as in the single-process run."""
    from benchmark.data.loading import ShuffledIndices, EpochSampler

    def epochs(make):
        sampler = EpochSampler(ShuffledIndices(num_items, seed=3))
        batches = make(sampler)
        out = []
        for task, epoch in ((0, 0), (0, 1), (1, 0)):
            sampler.set_epoch(task, epoch)
            out.append([list(batch) for batch in batches])
        return out

    before = torch.get_rng_state()
    expected = epochs(lambda s: torch.utils.data.BatchSampler(s, batch_size, drop_last))
    per_rank = [epochs(lambda s, r=rank: distributed.ShardedBatchSampler(s, batch_size, rank=r, world_size=world,
                                                                         drop_last=drop_last))
                for rank in range(world)]
    assert torch.equal(torch.get_rng_state(), before)
    assert expected[0] != expected[1]  # the order really changes with the epoch
    for e, whole in enumerate(expected):
        whole = [batch for batch in whole if len(batch) >= world]  # too small to split: dropped
        assert [sum((ranks[e][k] for ranks in per_rank), []) for k in range(len(whole))] == whole
        assert all(len(ranks[e]) == len(whole) for ranks in per_rank)
        sampler = EpochSampler(ShuffledIndices(num_items, seed=3))
        assert all(len(distributed.ShardedBatchSampler(sampler, batch_size, rank=r, world_size=world,
                                                       drop_last=drop_last)) == len(whole) for r in range(world))


def test_a_batch_size_that_does_not_divide_is_refused():
    with pytest.raises(distributed.ConfigError, match="batch_size 10 over 4 processes"):
        distributed.check_batch_size(10, 4)
    assert distributed.check_batch_size(12, 4) == 3


def test_the_processes_shares_add_up_to_the_whole_batch_loss():
    """info_nce_share over any split of the batch sums to info_nce of the whole batch, and so do
    the gradients with respect to every feature."""
    torch.manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1).requires_grad_()
    scale = torch.tensor(20.0)
    whole = info_nce(images, texts, scale)
    expected = torch.autograd.grad(whole, [images, texts])
    for counts in ([4, 3], [3, 2, 2], [7]):
        starts = [sum(counts[:r]) for r in range(len(counts))]
        shares = [info_nce_share(images[s:s + n], texts[s:s + n], images, texts, scale, s, 7)
                  for s, n in zip(starts, counts)]
        total = sum(shares)
        assert float(total.detach()) == pytest.approx(float(whole.detach()), rel=1e-6), counts
        got = torch.autograd.grad(total, [images, texts])
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, atol=1e-6), counts


# ---- one step's gradients -------------------------------------------------------------------------
def _gradient_worker(out: Path) -> None:
    """Under torchrun: each method's gradient of one step, on the whole batch (every process
    computes it alone) and split (the strategy's loss and gradient sum); process 0 writes the
    differences."""
    from benchmark.backbone import load_backbone
    from benchmark.method import TrainData
    from benchmark.strategy import ContrastiveStrategy, DivergenceWatch

    torch.set_num_threads(1)
    distributed.start("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    report = {}
    for name, cls in (("finetune", Finetune), ("sprompts", SPrompts)):
        for batch_size in (6, 5):  # splits 3 + 3, and 3 + 2 (padded for the gather)
            torch.manual_seed(0)
            backbone = load_backbone("clvl-tiny", device="cpu")
            method = cls(backbone)
            method.before_training_exp(TrainData(task_id=0, task_name="t", dataset=None, encode_batch_size=4,
                                                 device=torch.device("cpu")))
            params = [p for p in method.trainable_parameters() if p.requires_grad]
            images = torch.randn(batch_size, 3, *backbone.image_size)
            tokens = backbone.tokenizer([f"a {c} shape number {i}" for i, c in
                                         zip(range(batch_size), ["red", "blue", "green", "tiny", "big", "odd"])])
            tasks = torch.zeros(batch_size, dtype=torch.long)

            whole = info_nce(*method.training_features(images, tokens, tasks), method.logit_scale())
            whole.backward()
            reference = [p.grad.clone() for p in params]
            method.zero_grad(set_to_none=True)

            counts = distributed.split_counts(batch_size, world)
            mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
            step = SimpleNamespace(method=method, mb_output=method.training_features(images[mine], tokens[mine],
                                                                                      tasks[mine]),
                                   watch=DivergenceWatch(torch.device("cpu")), epoch_iteration=0)
            share = ContrastiveStrategy.criterion(step)
            step.last_train_loss = float(step._train_loss)
            share.backward()
            distributed.sum_gradients(params)
            scale = max(float(g.abs().max()) for g in reference)
            report[f"{name}/{batch_size}"] = {
                "max_abs": max(float((p.grad - g).abs().max()) for p, g in zip(params, reference)),
                "scale": scale, "loss": float(whole), "split_loss": step.last_train_loss,
                "parameters": len(params)}
    # The processes' global generators may drift apart (a random crop retried on one process's
    # image): the epoch's order must still be one order, cut into disjoint parts.
    from benchmark.data.loading import EpochSampler, ShuffledIndices

    torch.manual_seed(100 + rank)
    mine = [[index for _, _, index in batch]
            for batch in distributed.ShardedBatchSampler(EpochSampler(ShuffledIndices(11, seed=5)), 4,
                                                         rank=rank, world_size=world)]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    batches = [sum((theirs[k] for theirs in everyone), []) for k in range(len(mine))]
    report["sampler"] = {"batch_sizes": [len(b) for b in batches], "items": sorted(sum(batches, []))}
    if rank == 0:
        out.write_text(json.dumps(report))


def test_one_step_gives_the_single_process_gradients(tmp_path):
    out = tmp_path / "gradients.json"
    done = torchrun(str(Path(__file__)), "gradients", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sampler = report.pop("sampler")
    assert sampler == {"batch_sizes": [4, 4, 3], "items": list(range(11))}  # every pair once, in global batches
    assert set(report) == {"finetune/6", "finetune/5", "sprompts/6", "sprompts/5"}
    for case, figures in report.items():
        assert figures["parameters"] > 0 and figures["scale"] > 0, case
        assert figures["max_abs"] <= GRADIENT_RTOL * figures["scale"], (case, figures)
        assert figures["split_loss"] == pytest.approx(figures["loss"], rel=1e-6), (case, figures)
    print("ddp gradients:", json.dumps(report))


# ---- a whole run -----------------------------------------------------------------------------------
def _outcomes(out: Path) -> dict[str, tuple[dict, dict]]:
    """method name -> (record, final checkpoint's method state)."""
    found = {}
    for record_path in sorted((out / "runs").glob("*.json")):
        record = json.loads(record_path.read_text())
        checkpoint = torch.load(out / "checkpoints" / record_path.stem / "checkpoint.pt", weights_only=True)
        found[record["method"]] = record, checkpoint
    return found


@pytest.fixture(scope="module")
def single_and_split(tmp_path_factory, cache_dir):
    base = tmp_path_factory.mktemp("ddp-runs")
    code, _, err = run_main(["run", *STEADY, *TINY, "--cache-dir", str(cache_dir), "--output-dir", str(base / "one")])
    assert code == 0, err
    done = torchrun("-m", "benchmark", "run", *STEADY, *TINY, "--cache-dir", str(cache_dir),
                    "--output-dir", str(base / "two"), "--ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "one", base / "two", done


def test_a_split_run_ends_with_the_single_process_results(single_and_split):
    one, two, _ = single_and_split
    single, split = _outcomes(one), _outcomes(two)
    assert set(single) == set(split) and len(single) == 3
    figures = {}
    for method, (record, checkpoint) in single.items():
        other_record, other_checkpoint = split[method]
        assert other_record["recall"] == record["recall"], method
        assert other_record["routing_accuracy"] == record["routing_accuracy"], method
        state, other = checkpoint["method_state"], other_checkpoint["method_state"]
        assert state.keys() == other.keys()
        deltas = [float((state[k].float() - other[k].float()).abs().max()) for k in state
                  if torch.is_tensor(state[k]) and state[k].is_floating_point() and state[k].numel()]
        figures[method] = max(deltas, default=0.0)  # zeroshot saves no tensor (nothing trained)
    print("ddp final state max |Δ|:", figures)
    for method, delta in figures.items():
        assert delta <= STATE_ATOL, (method, delta)


def test_only_process_zero_writes(single_and_split):
    one, two, done = single_and_split
    assert sorted(p.name for p in (two / "runs").iterdir()) == sorted(p.name for p in (one / "runs").iterdir())
    assert done.stderr.count("wrote ") == 3  # one line per record, from process 0
    assert "error:" not in done.stderr


# ---- refusals --------------------------------------------------------------------------------------
def test_a_method_that_cannot_run_split_is_refused_before_training(tmp_path, cache_dir):
    done = torchrun("-m", "benchmark", "run", "--methods", "l2p", *TINY, "--cache-dir", str(cache_dir),
                    "--output-dir", str(tmp_path / "out"), "--ddp", timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: method 'l2p' does not support --ddp: its batch-wise prompt selection counts the prompts "
                     "chosen in each process's part of the batch, not in the whole batch; run it without --ddp"]
    assert "train colours" not in done.stderr and not (tmp_path / "out" / "runs").exists()


def test_replay_is_refused():
    params = Finetune.Config(replay_memory=4)
    assert "replay memory" in distributed.refusal(Finetune, params)
    assert distributed.refusal(Finetune, Finetune.Config()) is None


@pytest.mark.parametrize("control", [RunControl(ddp=True, resume=True), RunControl(ddp=True, resume_anyway=True)])
def test_resume_with_ddp_is_refused(control):
    config = SimpleNamespace(training=SimpleNamespace(batch_size=4))
    with pytest.raises(distributed.ConfigError, match="do not work with --ddp yet"):
        check_split([], config, control)


def test_ddp_without_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_main(["run", "--methods", "finetune", *TINY, "--output-dir", str(tmp_path), "--ddp"])
    assert code == 2
    error_line(err, "--ddp needs the environment torchrun sets", "torchrun --nproc_per_node=K -m benchmark run")


if __name__ == "__main__":  # torchrun's script for the gradient test
    if sys.argv[1] == "gradients":
        _gradient_worker(Path(sys.argv[2]))
