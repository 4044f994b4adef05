"""Non-finite steps never reach the weights: an inf in one latent sample skips exactly that step
(no update of weights, EMA or optimiser state) on every rank; a diverging run (lr=1e6) stops
non-zero naming its last good checkpoint, and no checkpoint or export ever holds a non-finite weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_train, tiny_run
from test_train_distributed import four_samples, run_train  # noqa: F401 (a fixture)

from magitrain.checkpoint.export import export
from magitrain.errors import UserError
from magitrain.launch import train

BAD = 2  # the inf goes into the batch of the step after global step 2: step 3 is skipped


def probe(out, rank: int = 0, mode: str = "latent") -> list[str]:
    return [
        f"+callbacks.probe.mode={mode}",
        "+callbacks.probe._target_=tests.nonfinite_probe.InjectInf",
        f"+callbacks.probe.step={BAD}",
        f"+callbacks.probe.rank={rank}",
        f"+callbacks.probe.out={out}",
    ]


def check_probe(record: dict) -> None:
    steps = record["steps"]
    assert record["skipped"] == 1
    for step, seen in steps.items():
        if int(step) == BAD + 1:  # nothing moved: weights, EMA, AdamW moments
            assert seen["changed"] == [], seen["changed"]
        else:  # every other step moved the weights and the EMA
            assert any(k.startswith("module.model.") for k in seen["changed"])
            assert any(k.startswith("module.ema.") for k in seen["changed"])


def test_an_inf_in_one_latent_sample_skips_that_step_only(latent_shards, tmp_path):
    overrides = tiny_run(latent_shards, "trainer.max_steps=5", *probe(tmp_path / "probe"))
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 5
    record = json.loads((tmp_path / "probe" / "rank0.json").read_text())
    assert (
        record["steps"][str(BAD + 1)]["loss"] == float("inf")
        or record["steps"][str(BAD + 1)]["loss"] != record["steps"][str(BAD + 1)]["loss"]
    )
    check_probe(record)


def _train_py(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_diverging_run_stops_non_zero_and_writes_no_non_finite_checkpoint(latent_shards, tmp_path):
    result = _train_py(
        [
            *tiny_run(latent_shards),
            "trainer.max_steps=12",
            "module.optim.lr=1e6",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "training diverged: steps" in output and "max_consecutive=3" in output
    saved = sorted((tmp_path / "checkpoints").glob("step*.ckpt"))
    assert saved and f"Last good checkpoint: {saved[-1]}" in output
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    export(saved[-1], tmp_path / "export", ema=True)  # the EMA of a skipped run is finite as well


def test_export_refuses_non_finite_weights_naming_the_tensor(latent_shards, tmp_path):
    train(compose_train(tiny_run(latent_shards, "trainer.max_steps=1"), tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["ema.final_linear_video.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    export(tmp_path / "nan.ckpt", tmp_path / "raw_ok")  # the raw weights are finite
    with pytest.raises(UserError, match=r"final_linear_video.weight.*not finite"):
        export(tmp_path / "nan.ckpt", tmp_path / "ema_bad", ema=True)
    assert not (tmp_path / "ema_bad").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_written(latent_shards, tmp_path):
    from magitrain.callbacks.nonfinite import NonFiniteCheckpointError

    trainer = train(compose_train(tiny_run(latent_shards, "trainer.max_steps=1"), tmp_path))
    with torch.no_grad():
        trainer.lightning_module.model.final_linear_audio.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match="model.final_linear_audio.weight is not finite"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_rank_skips_the_step_only_one_rank_saw_an_inf(strategy, four_samples, tmp_path):  # noqa: F811
    """Two gloo processes; only rank 1's loss of step 3 is NaN (its gradients stay finite). Both
    ranks skip that step and continue in step: the decision is reduced over the ranks."""
    extra = ["trainer.max_steps=5", *probe(tmp_path / "probe", rank=1, mode="loss")]
    if strategy == "fsdp2":
        extra.append("module.parallel.param_dtype=float32")  # CPU autocast does not cover bf16 shards
    run_train(tmp_path, four_samples, 2, strategy, 2, tuple(extra))
    for rank in (0, 1):
        check_probe(json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text()))
