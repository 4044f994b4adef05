"""SR data: LR/HR pairs in the shard index and inspect_shards, and the LR latent made on the fly
from raw clips (pixels resized down, then encoded) for an SR run on raw shards."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from conftest import compose_train

from magitrain.data.synthetic import make_demo_dataset, make_latent_dataset
from magitrain.recipes.sr import downscale_pixels

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "data_tools" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_inspect_shards_reports_sr_pair_coverage(tmp_path, capsys):
    make_latent_dataset(
        tmp_path / "pairs", num_samples=3, per_shard=3, latent_shapes=((3, 4, 6),), text_dim=8, sr_factor=2
    )
    make_latent_dataset(
        tmp_path / "plain", num_samples=2, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=8
    )
    capsys.readouterr()
    assert (
        tool(
            "inspect_shards.py",
            str(tmp_path / "pairs" / "*.tar"),
            str(tmp_path / "plain" / "*.tar"),
            "--json",
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["sr_pairs"] == {"4x6 <- 2x3": 3, "4x6 <- no LR": 2}


def test_downscale_keeps_dtype_frames_and_refuses_a_size_it_cannot_halve():
    video = torch.randint(0, 256, (1, 3, 5, 64, 96), dtype=torch.uint8)
    low = downscale_pixels(video, 2)
    assert low.shape == (1, 3, 5, 32, 48) and low.dtype == torch.uint8
    torch.testing.assert_close(low.float().mean(), video.float().mean(), atol=2.0, rtol=0)
    import pytest

    with pytest.raises(ValueError, match="multiple of 32"):
        downscale_pixels(torch.zeros(1, 3, 5, 48, 96, dtype=torch.uint8), 2)


def test_sr_recipe_on_raw_shards_makes_the_lr_latent_on_the_fly(tmp_path):
    from magitrain.launch import train

    clips = tmp_path / "clips"
    make_demo_dataset(clips, num_clips=2, seconds=0.5, size=(64, 96), seed=3)
    shards = tmp_path / "shards"
    tool("make_shards.py", str(clips), str(shards), "--max-count", "2", "--workers", "1")
    cfg = compose_train(
        [
            "recipe=sr_finetune_540p",
            "model=tiny",
            "codecs=tiny",
            "data=raw",
            "trainer=cpu",
            "debug=fast",
            "trainer.max_steps=2",
            "callbacks.progress_bar=null",
            f"data.shards={shards}/*.tar",
            "data.num_workers=0",
            "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]",
        ],
        tmp_path / "run",
    )
    seen = {}
    from magitrain.recipes import SRFineTuneModule

    original = SRFineTuneModule.on_after_batch_transfer

    def spy(self, batch, idx):
        out = original(self, batch, idx)
        seen.update(hr=out["video_latent"].shape, lr=out["lr_video_latent"].shape)
        return out

    SRFineTuneModule.on_after_batch_transfer = spy
    try:
        trainer = train(cfg)
    finally:
        SRFineTuneModule.on_after_batch_transfer = original
    assert trainer.global_step == 2
    assert seen["lr"][:3] == seen["hr"][:3] and tuple(seen["lr"][3:]) == (
        seen["hr"][3] // 2,
        seen["hr"][4] // 2,
    )
