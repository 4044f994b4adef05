"""`codecs.offload=true`: the frozen codecs wait in host memory during training and visit the
device only while they encode a raw batch (or generate a validation clip), through the inference
pipeline's StageResidency. On the CPU the bookkeeping runs (what moves when); the GPU test checks
where the weights are."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from test_data_raw import tool
from test_dmd_recipe import dmd_run, teacher_ckpt  # noqa: F401 (a fixture)
from test_train_base import step_losses

from magitrain.codecs import build_tiny_codecs
from magitrain.data.synthetic import make_demo_dataset
from magitrain.launch import train

ONE_USE = [("load", "codecs"), ("release", "codecs")]


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    clips = tmp_path_factory.mktemp("offload_clips")
    make_demo_dataset(clips, num_clips=2, seconds=0.5, size=(64, 96), seed=3)
    shards = tmp_path_factory.mktemp("offload_shards")
    tool("make_shards.py", str(clips), str(shards), "--max-count", "2", "--workers", "1")
    return shards


def _run(shards, out, offload: bool):
    overrides = [
        "model=tiny", "codecs=tiny", f"codecs.offload={str(offload).lower()}", "data=raw", "trainer=cpu",
        "debug=fast", "trainer.max_steps=2", "trainer.log_every_n_steps=1", f"data.shards={shards}/*.tar",
        "data.num_workers=0", "data.shuffle=false",
        "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]",
        "callbacks=validation", "callbacks.progress_bar=null", "callbacks.validation.every_n_steps=2",
        "callbacks.validation.prompts=[A dog barks]", "callbacks.validation.seconds=0.32",
        "callbacks.validation.resolution=64x32",
    ]  # fmt: skip
    return train(compose_train(overrides, out))


def test_offloaded_codecs_train_and_validate_like_resident_ones(raw_shards, tmp_path):
    resident = _run(raw_shards, tmp_path / "resident", offload=False)
    offloaded = _run(raw_shards, tmp_path / "offloaded", offload=True)
    codecs = offloaded.lightning_module.codecs
    assert resident.lightning_module.codecs.residency is None
    assert codecs.residency.log == ONE_USE * 2  # each of the two raw batches, nothing in between
    want = step_losses(tmp_path / "resident" / "csv" / "metrics.csv")
    got = step_losses(tmp_path / "offloaded" / "csv" / "metrics.csv")
    assert sorted(got) == [0, 1] and got == want
    assert (tmp_path / "offloaded" / "validation" / "step00000002" / "sample0.mp4").is_file()


def test_sr_on_raw_shards_encodes_hr_and_lr_in_one_visit(raw_shards, tmp_path):
    overrides = [
        "recipe=sr_finetune_540p", "model=tiny", "codecs=tiny", "codecs.offload=true", "data=raw",
        "trainer=cpu", "debug=fast", "trainer.max_steps=2", "callbacks.progress_bar=null",
        f"data.shards={raw_shards}/*.tar", "data.num_workers=0",
        "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]",
        "module.flow.lr_size=64x32",  # the LR clip (WxH); the default is the 448x256 base grid
    ]  # fmt: skip
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 2
    assert trainer.lightning_module.codecs.residency.log == ONE_USE * 2


def test_dmd2_encodes_its_negative_prompt_in_one_visit_and_takes_both_optimiser_options(
    latent_shards,
    teacher_ckpt,  # noqa: F811
    tmp_path,
):
    from magitrain.recipes.low_precision_adamw import AdamWBf16States, TorchaoAdamW8bit

    overrides = dmd_run(
        latent_shards, teacher_ckpt, "codecs=tiny", "codecs.offload=true", "trainer.max_steps=2",
        "module.optim.states=8bit", "module.critic_optim.states=bfloat16",
    )  # fmt: skip
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step > 0
    assert trainer.lightning_module.codecs.residency.log == ONE_USE  # encoded once, then cached
    student, critic = trainer.optimizers
    assert type(student) is TorchaoAdamW8bit and type(critic) is AdamWBf16States
    assert critic.state and student.state  # both stepped


def test_nested_uses_move_the_codecs_once():
    codecs = build_tiny_codecs(offload=True).to("cpu")
    with codecs.on_device():
        with codecs.on_device():
            emb, _ = codecs.text.encode(["hello"])
        assert codecs.residency.resident() == {"codecs"}
    assert codecs.residency.log == ONE_USE and codecs.residency.resident() == set()
    want, _ = build_tiny_codecs().text.encode(["hello"])
    assert torch.equal(emb, want)


@pytest.mark.gpu
def test_offloaded_codecs_hold_no_device_memory_between_uses():
    codecs = build_tiny_codecs(offload=True)
    before = torch.cuda.memory_allocated()
    codecs.to("cuda")
    assert torch.cuda.memory_allocated() == before
    assert all(p.device.type == "cpu" and p.is_pinned() for p in codecs.text.model.parameters())
    with codecs.on_device():
        assert all(p.device.type == "cuda" for p in codecs.video.parameters())
        emb, _ = codecs.text.encode(["hello"])
        assert emb.device.type == "cuda"
    assert all(p.device.type == "cpu" for p in codecs.audio.parameters())
    del emb
    assert torch.cuda.memory_allocated() == before
