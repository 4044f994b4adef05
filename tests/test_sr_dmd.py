"""SR distillation (recipe=sr_dmd2_540p / sr_dmd2_1080p, magitrain.recipes.SRDMD2Module) on the tiny
model: what the networks are fed (the SR source, the fixed audio input, the unguided teacher), the
recipes end to end on generated LR/HR pairs, export -> `infer.py sr_ckpt=` sampling the student's
2 distilled steps, and the distilled SR sampler itself. Exact resume after SIGKILL is
tests/test_dmd_recipe.py's resume test, parametrised with this recipe; the proof that it distils is
tests/test_sr_dmd_toy.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train, tiny_run
from hydra.utils import instantiate

from magitrain.checkpoint import save_official
from magitrain.flow.schedules import flow_grid, sr_renoise_coefficient
from magitrain.flow.sr import sample_super_resolution, upsample_latent, vp_renoise
from magitrain.model import MagiHumanDiT, tiny

# each recipe with its tiny model: the 1080p one with frame-local attention (tiny_sr1080), as released
RECIPES = {"sr_dmd2_540p": "tiny", "sr_dmd2_1080p": "tiny_sr1080", "lora_sr_dmd2_1080p": "tiny_sr1080"}
A = float(sr_renoise_coefficient(220))


@pytest.fixture(scope="module")
def sr_teacher(tmp_path_factory):
    """A released-layout SR checkpoint of the tiny model (random weights)."""
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("sr_teacher") / "sr")


def sr_dmd_run(pairs, teacher, recipe="sr_dmd2_540p", *extra: str) -> list[str]:
    return tiny_run(
        pairs,
        f"recipe={recipe}",
        f"model={RECIPES[recipe]}",
        f"teacher={teacher}",
        "module.dmd.ttur=2",
        "module.optim.lr=1e-3",  # large enough to see every network move in a few steps
        "module.critic_optim.lr=1e-3",
        *extra,
    )


def _module(teacher, tmp_path, *extra):
    overrides = ["recipe=sr_dmd2_540p", "model=tiny", f"teacher={teacher}", *extra]
    module = instantiate(compose_train(overrides, tmp_path).module)
    module.configure_model()
    return module


def _batch(B=2, T=3):
    g = torch.Generator().manual_seed(0)
    return {
        "video_latent": torch.randn(B, 48, T, 4, 6, generator=g),
        "lr_video_latent": torch.randn(B, 48, T, 2, 3, generator=g),
        "audio_latent": torch.randn(B, 9, 64, generator=g),
        "text_emb": torch.randn(B, 5, 64, generator=g),
        "text_len": torch.tensor([5, 3]),
        "key": [f"k{i}" for i in range(B)],
    }


def _inputs(network) -> list[tuple]:
    """Every forward of `network` records (video, audio, coords_style) here."""
    seen = []
    network.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0], args[1], kwargs.get("coords_style"))),
        with_kwargs=True,
    )
    return seen


def test_the_student_starts_from_the_sr_source_and_every_call_sees_the_fixed_audio(sr_teacher, tmp_path):
    """The student's first call gets `a up(lr) + sqrt(1 - a^2) eps` (a = 0.8389, index 220, no
    jitter); student, critic and teacher all get the one audio input `0.7 eps + 0.3 audio` of the
    step and v1 text positions; the generator loss asks the teacher once per evaluation (no CFG, no
    negative prompt) and logs no audio; the score levels lie in the recipe's [score_lo, score_hi]."""
    module, batch = _module(sr_teacher, tmp_path, "module.dmd.p_image=0"), _batch()
    seen = {name: _inputs(getattr(module, name)) for name in ("model", "critic", "teacher")}
    x0 = module._simulate(module._context(batch), phase=0)
    assert set(x0) == {"video"}  # the only sampled modality
    ctx = module._context(batch)  # the same per-sample draws again (seeded by step and key)
    eps = module._draw(ctx)["video"]
    lr_up = upsample_latent(batch["lr_video_latent"], batch["video_latent"].shape[2:])
    torch.testing.assert_close(seen["model"][0][0], vp_renoise(lr_up, torch.tensor(A), eps))
    g = module.sample_generators(batch, "sr")
    eps_audio = torch.stack([torch.randn(9, 64, generator=gen) for gen in g])
    audio_in = 0.7 * eps_audio + 0.3 * batch["audio_latent"]
    from magitrain.flow import dmd as core

    s, ends = module._score_draw(ctx)
    assert float(s.min()) >= module.dmd_config.score_lo and float(s.max()) <= module.dmd_config.score_hi
    loss, logs = core.generator_loss(
        x0, module._guided_teacher(ctx), module._velocity(module.critic, ctx), s=s, eps=ends
    )
    assert len(seen["teacher"]) == 1 and set(logs) == {"loss_video", "dmd_grad_video", "teacher_gap_video"}
    for name, calls in seen.items():
        for _, audio, coords in calls:
            torch.testing.assert_close(audio, audio_in, msg=name)
            assert coords == "v1", name
    # the score losses' noise end is a fresh source too: the same LR, fresh eps
    assert not torch.equal(ends["video"], seen["model"][0][0])
    again = module._context(batch)
    module._draw(again)  # (eps above, then the score levels, then the score noise)
    for gen in again["gens"]:
        core.score_sigmas(1, generator=gen)
    torch.testing.assert_close((ends["video"] - A * lr_up) / (1 - A**2) ** 0.5, module._draw(again)["video"])


@pytest.mark.parametrize("student_steps", [2, 1])
def test_the_distilled_sr_sampler_is_the_students_simulation_from_the_source(student_steps):
    """`sample_super_resolution(sampler="distilled")`: x0 of the source, re-noised towards a fresh
    source at the next level of flow_grid(steps), the audio input fixed; no draws for UniPC's."""
    torch.manual_seed(0)
    net = MagiHumanDiT(tiny().replace(coords_style="v1")).eval()
    video, audio, text = torch.randn(1, 48, 2, 2, 3), torch.randn(1, 4, 64), torch.randn(1, 5, 64)
    got = sample_super_resolution(
        net, video, audio, text, size=(2, 4, 6), steps=student_steps, sampler="distilled",
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    up = upsample_latent(video, (2, 4, 6))
    x = vp_renoise(up, torch.tensor(A), torch.randn(up.shape, generator=g))
    audio_in = 0.7 * torch.randn(audio.shape, generator=g) + 0.3 * audio
    sigmas = flow_grid(student_steps)[1][:-1].tolist()  # (2: s = 0.9998, 0.833)
    with torch.no_grad():
        for i, s in enumerate(sigmas):
            x0 = x - s * net(x, audio_in, text)[0]
            if i + 1 < len(sigmas):
                x = sigmas[i + 1] * vp_renoise(up, torch.tensor(A), torch.randn(up.shape, generator=g))
                x = x + (1 - sigmas[i + 1]) * x0
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="without guidance"):
        sample_super_resolution(
            net, video, audio, text, size=(2, 4, 6), sampler="distilled", guidance_scale=torch.ones(1),
            negative_text=text,
        )  # fmt: skip


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("sr_pairs")
    make_latent_dataset(out, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2)
    return out


# the LoRA variant: LoRA-DMD's adapters over one frozen SR base, the SR module's source and audio;
# TREAD (issue 26): the student's and critic's training forwards route under the local window
@pytest.mark.parametrize(
    "recipe, extra",
    [("sr_dmd2_1080p", ()), ("lora_sr_dmd2_1080p", ()), ("sr_dmd2_1080p", ("module.tread.rate=0.5",))],
    ids=["sr_dmd2_1080p", "lora_sr_dmd2_1080p", "sr_dmd2_1080p-tread"],
)
def test_the_1080p_recipe_trains_a_one_step_student_with_local_attention(
    recipe, extra, pairs, sr_teacher, tmp_path
):
    from magitrain.launch import train
    from magitrain.recipes import SRDMD2Module

    overrides = sr_dmd_run(pairs, sr_teacher, recipe, "module.dmd.student_steps=1", *extra)
    trainer = train(compose_train(overrides, tmp_path / "run"))
    module = trainer.lightning_module
    assert isinstance(module, SRDMD2Module)
    assert (module.last_route is not None) == bool(extra)  # the last training forward's route
    if recipe.startswith("lora"):  # only the adapters train; the teacher is the frozen base itself
        trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
        assert trained and all("lora" in n for n in trained)
    assert trainer.global_step == 3 and module._critic_steps == 6
    assert module.model_config.local_attn_layers == (0, 1, 2)
    assert module.hparams["sampling"] == {"sampler": "distilled", "steps": 1, "stage": "sr"}
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/generator_loss"])))


def test_export_ema_gives_an_sr_student_that_infer_py_samples_in_2_steps(pairs, sr_teacher, tmp_path):
    """Train, `export --ema`: config.json says v1 text positions and the distilled 2-step SR
    sampler; `infer.py sr=... sr_ckpt=` behind a base checkpoint then samples the SR stage so
    without sr_steps= / sr_sampler=, which override it."""
    import infer
    from magitrain.checkpoint import load_official
    from magitrain.checkpoint.export import export
    from magitrain.checkpoint.official import read_config
    from magitrain.data.index import probe_media
    from magitrain.launch import train

    overrides = sr_dmd_run(pairs, sr_teacher, "sr_dmd2_540p", "callbacks.ema.start_step=0")
    trainer = train(compose_train(overrides, tmp_path / "run"))
    out = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "student", ema=True)
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"] == {"sampler": "distilled", "steps": 2, "stage": "sr"}
    assert read_config(out).coords_style == "v1"
    loaded = load_official(MagiHumanDiT(tiny()), out)
    for k, v in trainer.lightning_module.ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    clip = tmp_path / "sr.mp4"
    infer.main([
        f"ckpt={sr_teacher}", "model=tiny", "codecs=tiny", "prompt=hello", "seconds=0.32", "resolution=64x32",
        "sr=128x64", f"sr_ckpt={out}", f"out={clip}",
    ])  # fmt: skip
    sampled = json.loads(clip.with_suffix(".json").read_text())
    assert (sampled["sr_sampler"], sampled["sr_steps"]) == ("distilled", 2)
    assert (sampled["sampler"], sampled["steps"]) == ("distilled", 8)  # the base stage's own default
    assert (probe_media(str(clip))["width"], probe_media(str(clip))["height"]) == (128, 64)
    assert infer.sr_sampling_for(infer.parse([f"sr_ckpt={out}", "sr_steps=1"])) == (1, "distilled")
    assert infer.sr_sampling_for(infer.parse([f"sr_ckpt={out}", "sr_sampler=unipc"])) == (5, "unipc")
    assert infer.sr_sampling_for(infer.parse([f"sr_ckpt={sr_teacher}"])) == (
        5,
        "unipc",
    )  # released: as before
