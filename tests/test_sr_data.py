"""SR data: LR/HR pairs in the shard index and inspect_shards, and the LR latent made on the fly
from raw clips (pixels resized down, then encoded) for an SR run on raw shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, load_script
from hydra.utils import instantiate

from magitrain.data.encode import resize_video
from magitrain.data.synthetic import make_demo_dataset, make_latent_dataset
from magitrain.inference.shapes import RESOLUTIONS
from magitrain.model import tiny
from magitrain.recipes import SRConfig, SRFineTuneModule

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str):
    return load_script(ROOT / "data_tools" / name).main(list(args))


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


def test_resize_video_keeps_dtype_and_frames_and_refuses_upscaling():
    video = torch.randint(0, 256, (1, 3, 5, 64, 96), dtype=torch.uint8)
    low = resize_video(video, (32, 64))  # to exactly (height, width): no crop, no kept aspect
    assert low.shape == (1, 3, 5, 32, 64) and low.dtype == torch.uint8
    torch.testing.assert_close(low.float().mean(), video.float().mean(), atol=2.0, rtol=0)
    with pytest.raises(ValueError, match="larger than the HR clip"):
        resize_video(video, (128, 64))


@pytest.mark.parametrize("recipe", ["sr_finetune_540p", "sr_finetune_1080p"])
def test_the_on_the_fly_lr_clip_is_the_base_grid_the_sampler_upsamples(recipe, tmp_path):
    """At 540p and 1080p alike the LR clip is 448x256 (latent 28x16): the base stage's output that the
    SR sampler upsamples, whatever the HR/LR ratio (1920/448 is not a whole number)."""
    cfg = compose_train([f"recipe={recipe}", "model=tiny"], tmp_path)
    module = SRFineTuneModule(tiny(), flow=instantiate(cfg.module.flow))
    assert module.lr_size == RESOLUTIONS["256p"]
    with pytest.raises(ValueError, match="flow.lr_size"):
        SRFineTuneModule(tiny(), flow=SRConfig(lr_size="480x20"))  # under 32 pixels (480x270 floors)


@pytest.mark.parametrize("hr", [(64, 128), (128, 64)], ids=["landscape", "portrait"])
def test_sr_recipe_on_raw_shards_makes_the_lr_latent_on_the_fly(hr, tmp_path):
    """The LR latent is the real tiny video VAE's encoding of the HR pixels resized to lr_size (a
    pooled HR latent, or pixels resized to another size, would not match), turned to the bucket's
    orientation as inference turns its base stage: a portrait 64x128 (WxH) bucket gets a 32x64 LR
    clip, not a stretched 64x32 one. The portrait case catches an LR size that ignores orientation
    (checked by planting it: the portrait case then fails)."""
    from magitrain.launch import train

    height, width = hr
    low = (height // 2, width // 2)  # lr_size=64x32 turned to the bucket's orientation
    clips = tmp_path / "clips"
    make_demo_dataset(clips, num_clips=2, seconds=0.5, size=hr, seed=3)
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
            f"data.buckets=[{{height: {height}, width: {width}, frames: 9, batch_size: 2}}]",
            "module.flow.lr_size=64x32",
        ],
        tmp_path / "run",
    )
    seen = []
    from magitrain.recipes import SRFineTuneModule as Module

    original = Module.on_after_batch_transfer

    def spy(self, batch, idx):
        out = original(self, batch, idx)
        B, C, n, H, W = batch["video"].shape  # uint8 HR pixels: resize each frame to `low` here
        frames = batch["video"].permute(0, 2, 1, 3, 4).reshape(B * n, C, H, W).float()
        pixels = F.interpolate(frames, size=low, mode="bilinear", antialias=True).round().clamp(0, 255)
        pixels = pixels.reshape(B, n, C, *low).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            want = self.codecs.video.encode(pixels / 127.5 - 1)
        seen.append((out["lr_video_latent"], want, out["video_latent"].shape))
        return out

    Module.on_after_batch_transfer = spy
    try:
        trainer = train(cfg)
    finally:
        Module.on_after_batch_transfer = original
    assert trainer.global_step == 2 and seen
    for lr, want, hr_shape in seen:
        assert lr.shape == (*hr_shape[:3], low[0] // 16, low[1] // 16)
        assert hr_shape[3:] == (height // 16, width // 16)
        torch.testing.assert_close(lr, want, atol=1e-4, rtol=1e-4)
