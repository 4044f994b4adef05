"""The memory planner: its fake-tensor step against a real step measured by the same tracker."""

from __future__ import annotations

import json

import pytest

from magitrain.model import get_config
from magitrain.plan import measure_step, plan
from magitrain.plan.__main__ import main
from magitrain.recipes import FlowMatchingModule


def _measure(name: str, fake: bool, checkpointing: bool, latent=(3, 4, 6), batch=2):
    from magitrain.parallel import ParallelConfig

    module = FlowMatchingModule(
        get_config(name), parallel=ParallelConfig(activation_checkpointing=checkpointing)
    )
    return measure_step(module, batch, latent, 16, "bf16-mixed", fake=fake), module


@pytest.mark.parametrize("name,checkpointing", [("tiny", False), ("tiny", True), ("golden_tiny", False)])
def test_fake_step_matches_real_step(name, checkpointing):
    planned, _ = _measure(name, fake=True, checkpointing=checkpointing)
    real, module = _measure(name, fake=False, checkpointing=checkpointing)
    # states: exact, and equal to what the real run's tensors hold
    for role in ("params", "grads", "optimizer", "ema", "frozen", "buffers"):
        assert getattr(planned, role) == getattr(real, role), role
    params = list(module.model.parameters())
    trained = sum(p.numel() * 4 for p in params)
    assert real.params == real.grads == {"model": trained} and real.ema == trained
    assert real.frozen == {}
    # two float32 moments per parameter and one float32 step counter per tensor
    assert real.optimizer == {"model": 2 * trained + 4 * len(params)}
    assert real.activations["step"] > 0
    assert abs(planned.activations["step"] - real.activations["step"]) <= 0.10 * real.activations["step"]
    assert abs(planned.peak - real.peak) <= 0.10 * real.peak


def test_checkpointing_lowers_planned_activations():
    off, _ = _measure("golden_tiny", fake=True, checkpointing=False, latent=(5, 8, 8))
    on, _ = _measure("golden_tiny", fake=True, checkpointing=True, latent=(5, 8, 8))
    assert on.activations["step"] < off.activations["step"]


def test_plan_shards_states_over_fsdp2_ranks(tmp_path):
    bucket = {"height": 64, "width": 96, "frames": 9, "batch_size": 1}
    one = plan(["model=tiny", "strategy=fsdp2"], 1, 2**30, bucket)
    four = plan(["model=tiny", "strategy=fsdp2"], 4, 2**30, bucket)
    for role in ("model params", "model grads", "model optimizer", "ema"):
        assert four.per_gpu[role] == one.per_gpu[role] // 4
    ddp = plan(["model=tiny", "strategy=ddp"], 4, 2**30, bucket)
    assert ddp.per_gpu["model params"] == one.per_gpu["model params"]
    assert one.fits and one.largest_batch >= 1
    offload = plan(["model=tiny", "strategy=fsdp2", "module.parallel.cpu_offload=true"], 4, 2**30, bucket)
    assert (
        offload.per_gpu["model optimizer"] == offload.per_gpu["model params"] == offload.per_gpu["ema"] == 0
    )
    assert offload.host == sum(
        four.per_gpu[r] for r in ("model params", "model grads", "model optimizer", "ema")
    )
    assert offload.per_gpu["activations"] == four.per_gpu["activations"]
    tight = plan(["model=tiny", "strategy=ddp"], 1, one.total // 2, bucket)
    assert not tight.fits and tight.suggestions


def test_cli_json(capsys):
    assert (
        main(["model=tiny", "gpus=2", "gpu_memory=1GB", "height=64", "width=96", "seconds=0.4", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 2 and out["bucket"]["frames"] == 9
    assert out["total"] == sum(out["per_gpu"].values())


def test_cli_rejects_bad_sizes():
    import os
    import subprocess
    import sys

    from conftest import REPO

    for bad, key in (("gpu_memory=lots", "gpu_memory"), ("gpus=0", "gpus")):
        proc = subprocess.run(
            [sys.executable, "-m", "magitrain.plan", "model=tiny", bad],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr and key in proc.stderr and "Traceback" not in proc.stderr
