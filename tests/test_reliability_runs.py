"""Run directories as a user meets them: resume with one line, one record per start, the final step
saved, short runs start with the default config, no versioned duplicate checkpoints."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_train, tiny_run
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train_base import read_metrics

from magitrain.checkpoint.resume import checkpoint_meta
from magitrain.launch import train


def _train_py(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _weights(ckpt) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_with_only_the_run_dir_equals_the_full_command_and_keeps_every_start(
    latent_shards, tmp_path, script
):
    def train_py(args: list[str]) -> None:  # train.py's __main__, in this process
        result = script("train.py", *args)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    full = tiny_run(latent_shards, "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=3")
    run, copy = tmp_path / "run", tmp_path / "copy"
    train_py([*full, f"hydra.run.dir={run}"])
    (first,) = (run / "starts").iterdir()
    first_record = {p.name: p.read_text() for p in first.iterdir()}
    shutil.copytree(run, copy, symlinks=True)  # a copied (or moved) run directory resumes the same

    # one line: no recipe, model, data or trainer arguments
    train_py([f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_steps=6"])
    train_py([*full, f"hydra.run.dir={copy}", "ckpt_path=last", "trainer.max_steps=6"])

    for run_dir in (run, copy):
        assert checkpoint_meta(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
        assert not list((run_dir / "checkpoints").glob("*-v*.ckpt"))  # no versioned duplicates
    want, got = _weights(copy / "checkpoints" / "last.ckpt"), _weights(run / "checkpoints" / "last.ckpt")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k

    starts = sorted((run / "starts").iterdir())
    assert len(starts) == 2 and starts[0] == first
    assert {p.name: p.read_text() for p in first.iterdir()} == first_record  # the first start's record
    second = [str(o) for o in OmegaConf.load(starts[1] / "overrides.yaml")]
    assert "model=tiny" in second and "ckpt_path=last" in second and "trainer.max_steps=6" in second
    assert "trainer.max_steps=3" not in second
    # the metrics history spans both starts
    steps = {int(r["step"]) for r in read_metrics(run / "csv" / "metrics.csv") if r.get("train/loss")}
    assert {0, 2, 5} <= steps


def test_the_final_step_is_always_saved(latent_shards, tmp_path):
    overrides = tiny_run(
        latent_shards, "callbacks.model_checkpoint.every_n_train_steps=3", "trainer.max_steps=4"
    )
    train(compose_train(overrides, tmp_path))
    assert checkpoint_meta(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*")) == [
        "step00000003.ckpt",
        "step00000004.ckpt",
    ]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_symlink()  # not a second copy of step 4


def test_a_short_run_starts_with_the_default_warmup_and_total_steps_needs_no_plus(
    latent_shards, tmp_path, caplog
):
    base = [o for o in tiny_run(latent_shards) if o != "debug=fast"]  # the recipe's own optimiser settings
    trainer = train(
        compose_train([*base, "trainer.max_steps=5", "module.optim.total_steps=10"], tmp_path / "a")
    )
    assert trainer.global_step == 5
    with caplog.at_level(logging.WARNING, logger="magitrain"):
        trainer = train(
            compose_train([*base, "trainer.max_steps=2", "module.optim.warmup_steps=1000"], tmp_path / "b")
        )
    assert trainer.global_step == 2
    assert "optim.warmup_steps=1000 is not shorter than the 2 training steps" in caplog.text


def test_restored_overrides_never_choose_code(tmp_path, capsys):
    """issue 29.10: resuming a run directory re-applied its starts/*/overrides.yaml whole, so a
    `_target_` written there (torch.load with weights_only false) was instantiated by the resume."""
    import pytest

    from magitrain.errors import UserError
    from magitrain.run_records import with_restored_overrides

    record = tmp_path / "starts" / "2026-01-01_00-00-00"
    record.mkdir(parents=True)
    (record / "config.yaml").write_text("seed: 1\n")
    planted = "+callbacks.evil={_target_: torch.load, f: /tmp/x, weights_only: false}"
    resume = [f"hydra.run.dir={tmp_path}", "ckpt_path=last"]
    for bad in (planted, "callbacks.ema._target_=torch.load", "hydra.searchpath=[file:///tmp]"):
        OmegaConf.save(OmegaConf.create(["model=tiny", bad]), record / "overrides.yaml")
        with pytest.raises(UserError, match=r"overrides.yaml: the restored override .* chooses code"):
            with_restored_overrides(resume)
    # the current command may give it: then it is the user's choice, not the run directory's
    OmegaConf.save(OmegaConf.create(["model=tiny", planted]), record / "overrides.yaml")
    assert with_restored_overrides([*resume, planted]) == ["model=tiny", *resume, planted]
    assert "restoring ['model=tiny']" in capsys.readouterr().err


def test_a_warmup_longer_than_the_run_is_clamped_for_every_schedule_with_one_warning(caplog):
    """The clamp was cosine-only: the DMD-2 demo (10 steps, warmup 20, constant schedule) never
    reached its learning rate."""
    from magitrain.recipes.optim import OptimConfig, lr_lambda

    for schedule in ("constant", "cosine"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="magitrain"):
            multiplier = lr_lambda(OptimConfig(warmup_steps=20, schedule=schedule), total_steps=10)
        assert multiplier(8) == 1.0, schedule  # the run reaches its learning rate before its end
        assert [r.getMessage() for r in caplog.records] == [
            "optim.warmup_steps=20 is not shorter than the 10 training steps: warming up over 9"
        ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="magitrain"):
        assert lr_lambda(OptimConfig(warmup_steps=5), total_steps=10)(4) == 1.0
    assert not caplog.records


def test_the_readme_demo_runs_compose_warmups_shorter_than_their_steps(tmp_path):
    """The README's DMD-2 (30 steps) and SR (20 steps) demo commands warned about their own
    settings: the demo experiment's 20 warm-up steps (the DMD-2 demo now warms up neither network)."""
    from magitrain.recipes.optim import warmup_length

    for recipe, steps in (("base_pretrain", 300), ("dmd2_distill", 30), ("sr_finetune_540p", 20)):
        cfg = compose_train(
            ["experiment=cpu_demo", f"recipe={recipe}", f"trainer.max_steps={steps}"], tmp_path
        )
        optims = [cfg.module.optim, *([cfg.module.critic_optim] if "critic_optim" in cfg.module else [])]
        for optim in map(instantiate, optims):
            assert 0 <= warmup_length(optim, steps) < steps, recipe
            assert optim.warmup_steps is None or optim.warmup_steps < steps, recipe  # no clamp: no warning


def test_a_fresh_start_into_a_folder_holding_checkpoints_is_refused_in_one_line(tmp_path):
    """A fresh start overwrote some of an earlier run's checkpoints and kept others; a later
    `ckpt_path=last` then resumed the earlier run (step 330 after a rerun that ended at 300)."""
    from magitrain.errors import UserError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step00000330.ckpt").write_bytes(b"an earlier run's")
    (tmp_path / "config.yaml").write_text("the earlier run's\n")
    with pytest.raises(UserError) as refused:
        train(compose_train(tiny_run(tmp_path), tmp_path))
    message = str(refused.value)
    assert "\n" not in message and "step00000330.ckpt" in message, message
    assert "ckpt_path=last" in message and "hydra.run.dir=" in message, message
    assert (tmp_path / "config.yaml").read_text() == "the earlier run's\n"  # nothing was touched


@pytest.mark.slow
def test_a_two_rank_resume_with_dropout_is_bit_exact(latent_shards, tmp_path):
    """LoRA dropout draws from each rank's global RNG. The restored RNG state was one draw ahead
    (the DataLoader took its base seed from the global RNG after the restore, where the
    uninterrupted run had taken it before the save), so a resume mid-epoch dropped other units.
    Two gloo DDP ranks, 4 steps per epoch: resumed from step 2, steps 2-5 and the weights at step
    6 must be the uninterrupted run's, bit for bit."""
    from test_train_base import step_losses

    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, tiny

    torch.manual_seed(0)
    base = save_official(MagiHumanDiT(tiny()), tmp_path / "base")
    run = tiny_run(
        latent_shards,
        "recipe=lora_base",
        f"init={base}",
        "module.lora.rank=4",
        "module.lora.dropout=0.5",
        "module.lora.base_dtype=fp32",
        "module.optim.lr=1e-2",
        "trainer.devices=2",
        "strategy=ddp",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_py([*run, f"hydra.run.dir={straight}"])
    step2 = straight / "checkpoints" / "step00000002.ckpt"
    _train_py([*run, f"hydra.run.dir={resumed}", f"ckpt_path={step2}"])

    want, got = step_losses(straight / "csv" / "metrics.csv"), step_losses(resumed / "csv" / "metrics.csv")
    assert sorted(got) == [2, 3, 4, 5] and all(got[s] == want[s] for s in got), (want, got)
    a, b = _weights(straight / "checkpoints" / "last.ckpt"), _weights(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _save_then_restore_rng(rank: int, init: str, ckpt: str) -> None:
    """One rank of test_each_rank_restores_its_own_rng_states."""
    import random

    import numpy as np
    import torch.distributed as dist

    from magitrain.callbacks import RNGState

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank), random.seed(100 + rank), np.random.seed(100 + rank)
        state = RNGState().state_dict()  # called on every rank; the checkpoint is rank 0's
        if rank == 0:
            torch.save(state, ckpt)
        want = (torch.rand(4), random.random(), np.random.rand())
        dist.barrier()
        torch.manual_seed(0), random.seed(0), np.random.seed(0)  # a restarted process: seeded alike
        RNGState().load_state_dict(torch.load(ckpt, weights_only=True))
        got = (torch.rand(4), random.random(), np.random.rand())
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:], f"rank {rank}: {got} != {want}"
    finally:
        dist.destroy_process_group()


def test_each_rank_restores_its_own_rng_states(tmp_path):
    """Only rank 0's RNG states were saved, and loaded into every rank: with states that differ per
    rank (CUDA generators of other devices, any rank-dependent draw), rank 1 continued rank 0's
    stream. Two gloo processes save through the checkpoint's path (rank 0 writes) and restore."""
    import torch.multiprocessing as mp

    mp.spawn(_save_then_restore_rng, args=(str(tmp_path / "init"), str(tmp_path / "rng.pt")), nprocs=2)


def test_a_run_without_the_checkpoint_callback_starts(latent_shards, tmp_path):
    """The stale-checkpoint check read `callbacks.model_checkpoint.dirpath` of a run that had turned
    the callback off (`callbacks.model_checkpoint=null`, as gpu_checks' slice runs do) and crashed."""
    cfg = compose_train(
        tiny_run(latent_shards, "trainer.max_steps=1", "callbacks.model_checkpoint=null"), tmp_path
    )
    assert train(cfg).global_step == 1
