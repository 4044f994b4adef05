"""SR fine-tuning: the source, target, audio input, s grid and v1 coordinates of the flow-matching
variant, observed at the real model's inputs; both recipes end to end on generated LR/HR pairs."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_train, tiny_run

from magitrain.flow.schedules import flow_grid
from magitrain.flow.sr import upsample_latent
from magitrain.model import tiny
from magitrain.recipes import RenoisedUpsample, SRConfig, SRFineTuneModule


def _module(model=None, **flow) -> SRFineTuneModule:
    torch.manual_seed(0)
    module = SRFineTuneModule(model or tiny(), flow=SRConfig(**flow))
    module.configure_model()
    return module


def _batch(keys=("a", "b")) -> dict:
    g = torch.Generator().manual_seed(1)
    B = len(keys)
    return {
        "video_latent": torch.randn(B, 48, 3, 4, 6, generator=g),
        "lr_video_latent": torch.randn(B, 48, 3, 2, 3, generator=g),
        "audio_latent": torch.randn(B, 9, 64, generator=g),
        "text_emb": torch.randn(B, 5, 64, generator=g),
        "text_len": torch.tensor([5, 3, 4][:B]),
        "key": list(keys),
    }


def _seen(module, batch) -> tuple[dict, dict]:
    seen = {}

    def hook(m, args, kwargs, out):
        seen.update(video=args[0], audio=args[1], kwargs=kwargs, out=out)

    handle = module.model.register_forward_hook(hook, with_kwargs=True)
    loss = module.flow_loss(batch)
    handle.remove()
    return seen, loss


def test_the_source_is_the_renoised_upsampled_lr_and_the_target_x1_minus_hr():
    module, batch = _module(p_image=0.0, source=RenoisedUpsample(jitter=0.0)), _batch()
    seen, loss = _seen(module, batch)
    d = module._draw(batch)  # the same per-sample draws (seeded by step and key)
    hr = batch["video_latent"]
    a = RenoisedUpsample().a
    x1 = a * upsample_latent(batch["lr_video_latent"], hr.shape[2:]) + (1 - a**2) ** 0.5 * d["eps_source"]
    s = d["s"].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(seen["video"], (1 - s) * hr + s * x1)
    expected = (seen["out"][0] - (x1 - hr)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss["video"], expected)
    # the LR latent is what the source is made of: changing it changes the input
    other = dict(batch, lr_video_latent=batch["lr_video_latent"] + 1)
    assert not torch.allclose(_seen(module, other)[0]["video"], seen["video"])


def test_the_audio_input_is_fixed_noise_mix_and_has_no_loss():
    module, batch = _module(p_image=0.0), _batch()
    seen, loss = _seen(module, batch)
    d = module._draw(batch)
    torch.testing.assert_close(seen["audio"], 0.7 * d["eps_audio"] + 0.3 * batch["audio_latent"])
    assert torch.equal(loss["audio"], torch.zeros(2))

    def scramble_audio(m, args, out):
        return out[0], out[1] + 100.0

    handle = module.model.register_forward_hook(scramble_audio)
    after = module.flow_loss(batch)
    handle.remove()
    torch.testing.assert_close(after["loss"], loss["loss"])


def test_text_coordinates_are_v1_even_with_a_v2_preset():
    v2 = _module(model=tiny(coords_style="v2"))
    v1 = _module(model=tiny(coords_style="v1"))
    v1.model.load_state_dict(v2.model.state_dict())
    batch = _batch()
    seen, loss_v2 = _seen(v2, batch)
    assert seen["kwargs"]["coords_style"] == "v1"
    torch.testing.assert_close(loss_v2["video"], v1.flow_loss(batch)["video"])
    # and the coordinates matter: the v2 forward on the same input differs
    with torch.no_grad():
        out_v2 = v2.model(seen["video"], seen["audio"], batch["text_emb"], text_len=batch["text_len"])
    assert not torch.allclose(out_v2[0], seen["out"][0])


def test_s_covers_the_five_step_sampler_grid_and_the_interval():
    module = _module(grid_fraction=0.5)
    keys = [f"k{i}" for i in range(200)]
    batch = _batch(keys)
    batch["text_len"] = torch.full((200,), 3)
    s = module._draw(batch)["s"]
    grid = flow_grid(5)[1][:-1]
    on_grid = (s[:, None] == grid[None]).any(1)
    assert 0.3 < on_grid.float().mean() < 0.7
    assert set(s[on_grid].tolist()) == set(grid.tolist())
    off = s[~on_grid]
    assert off.min() >= 0 and off.max() <= 1 and off.min() < 0.5 < off.max()


def test_jittered_a_and_the_pure_noise_source():
    gen = torch.Generator().manual_seed(0)
    source = RenoisedUpsample(a=0.839, jitter=0.03)
    draws = torch.stack([source.draw(gen) for _ in range(500)])
    assert draws.min() >= 0.809 - 1e-6 and draws.max() <= 0.869 + 1e-6 and draws.std() > 0.01
    noise = RenoisedUpsample(p_pure_noise=1.0)
    lr_up, eps = torch.randn(1, 48, 2, 2, 2), torch.randn(1, 48, 2, 2, 2)
    torch.testing.assert_close(noise(lr_up, eps, noise.draw(gen)), eps)
    with pytest.raises(ValueError, match="a \\+- jitter"):
        RenoisedUpsample(a=0.99, jitter=0.05)


def test_image_to_video_keeps_the_clean_hr_frame_0_and_ignores_a_reference_at_another_grid():
    module, batch = _module(p_image=1.0), _batch()
    batch["ref_latent"] = torch.randn(2, 48, 1, 2, 3)  # encoded at the LR size: not the SR frame
    seen, _ = _seen(module, batch)
    assert torch.equal(seen["video"][:, :, 0], batch["video_latent"][:, :, 0])
    batch["ref_latent"] = torch.randn(2, 48, 1, 4, 6)  # at the SR grid: it is the frame
    seen, _ = _seen(module, batch)
    assert torch.equal(seen["video"][:, :, :1], batch["ref_latent"])


def test_a_batch_without_lr_latents_is_refused_by_name():
    module, batch = _module(), _batch()
    del batch["lr_video_latent"]
    with pytest.raises(ValueError, match="lr_video_latent"):
        module.on_after_batch_transfer(batch, 0)
    batch["lr_video_latent"] = torch.randn(2, 48, 2, 2, 3)
    with pytest.raises(ValueError, match="does not pair"):
        module.on_after_batch_transfer(batch, 0)


# each recipe with its tiny model: the 1080p one with frame-local attention (tiny_sr1080), as released
RECIPES = {"sr_finetune_540p": "tiny", "sr_finetune_1080p": "tiny_sr1080"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_a_few_steps_on_generated_pairs(recipe, tmp_path):
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.launch import train

    shards = tmp_path / "pairs"
    make_latent_dataset(
        shards, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2
    )
    # 2 batches per data epoch, logging every 3 steps: the losses were never logged (keyed on batch_idx)
    overrides = tiny_run(
        shards, f"recipe={recipe}", f"model={RECIPES[recipe]}", "trainer.log_every_n_steps=3"
    )
    trainer = train(compose_train(overrides, tmp_path / "run"))
    assert trainer.global_step == 3
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f) if r.get("train/loss")] == ["2"]
    module = trainer.lightning_module
    assert isinstance(module, SRFineTuneModule)
    local = module.model_config.local_attn_layers
    assert local == ((0, 1, 2) if recipe.endswith("1080p") else ())
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_exported_sr_run_is_what_infer_sr_ckpt_runs(recipe, tmp_path):
    """Train the recipe a few steps, export the released layout, and run `infer.py sr=WxH
    sr_ckpt=` with it behind a base checkpoint: an mp4 at the SR size."""
    import infer
    from magitrain.checkpoint import save_official
    from magitrain.checkpoint.export import export
    from magitrain.checkpoint.official import read_config
    from magitrain.data.index import probe_media
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.launch import train
    from magitrain.model import MagiHumanDiT

    shards = tmp_path / "pairs"
    make_latent_dataset(
        shards, num_samples=2, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2
    )
    overrides = tiny_run(shards, f"recipe={recipe}", f"model={RECIPES[recipe]}", "trainer.max_steps=1")
    train(compose_train(overrides, tmp_path / "run"))
    sr_dir = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "sr")
    config = read_config(sr_dir)
    assert config.coords_style == "v1"
    assert config.local_attn_layers == ((0, 1, 2) if recipe.endswith("1080p") else ())
    torch.manual_seed(0)
    base_dir = save_official(MagiHumanDiT(tiny()), tmp_path / "base")
    clip = tmp_path / "sr.mp4"
    infer.main([
        f"ckpt={base_dir}", "model=tiny", "codecs=tiny", "prompt=hello", "seconds=0.32", "resolution=64x32",
        "sr=128x64", f"sr_ckpt={sr_dir}", f"out={clip}",
    ])  # fmt: skip
    info = probe_media(str(clip))
    assert (info["width"], info["height"]) == (128, 64)


@pytest.mark.parametrize("recipe", RECIPES)
def test_sr_validation_refines_a_frozen_base_sample_and_logs_it_beside_the_upsampled_base(
    recipe, tmp_path, monkeypatch
):
    from magitrain.checkpoint import save_official
    from magitrain.data.index import probe_media
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.launch import train
    from magitrain.model import MagiHumanDiT

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    shards = tmp_path / "pairs"
    make_latent_dataset(
        shards, num_samples=2, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2
    )
    torch.manual_seed(0)
    base_dir = save_official(MagiHumanDiT(tiny()), tmp_path / "distill", config=tiny())
    overrides = [
        f"recipe={recipe}", f"model={RECIPES[recipe]}", "trainer=cpu", "debug=fast", "trainer.max_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2", f"data.shards={shards}/*.tar",
        "data.num_workers=0",
        "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]", "logger=wandb", "codecs=tiny",
        "callbacks=validation", "callbacks.progress_bar=null", "callbacks.validation.every_n_steps=2",
        "callbacks.validation.prompts=[A dog barks twice]", "callbacks.validation.seconds=0.32",
        "callbacks.validation.resolution=64x32", f"module.validation_base={base_dir}",
        "module.validation_steps=2", "module.validation_size=128x64",
    ]  # fmt: skip
    out = tmp_path / "run"
    train(compose_train(overrides, out))
    step = out / "validation" / "step00000002"
    for name in ("sample0.mp4", "sample0_lr_up.mp4"):
        info = probe_media(str(step / name))
        assert (info["width"], info["height"]) == (128, 64), name
    logged = list(
        (next((out / "wandb").glob("offline-run-*")) / "files" / "media" / "videos" / "val").glob("*.mp4")
    )
    assert len(logged) == 2  # the SR clip and the upsampled base clip


def test_sr_validation_without_a_base_model_says_what_it_needs():
    with pytest.raises(ValueError, match="module.validation_base"):
        _ = _module().validation_sampling
