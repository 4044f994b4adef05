"""Inference as released, at tiny size on the CPU: Decode timed as the release times it, output
upsampling, SR with CFG and its "trick", the guidance and SR settings as options, the negative prompt
from a file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from magitrain.codecs import build_tiny_codecs
from magitrain.codecs.media import upsample_frames, video_to_uint8
from magitrain.flow import Guidance, sample_super_resolution, sr_guidance_scales
from magitrain.inference import ClipShape, MagiHumanPipeline, Sampling
from magitrain.model import MagiHumanDiT, get_config

SIZE, SECONDS = "64x32", 0.32  # 9 frames, a 3 x 2 x 4 latent


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    return MagiHumanDiT(get_config("tiny")).eval(), MagiHumanDiT(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def codecs():
    return build_tiny_codecs(seed=0)


def test_decode_times_the_host_copy_and_the_uint8_frames_as_released(networks, codecs):
    """The release's Decode step holds the device-to-host copy and the uint8 conversion (its audio
    step the audio decode and resampling); the clip's mp4 frames are those uint8 frames. Caught: the
    Decode column stopped at the on-device decode and the uint8 conversion ran outside Total."""
    pipe = MagiHumanPipeline(networks[0], codecs, device="cpu")
    clip = pipe.generate("a dog barks", seconds=SECONDS, resolution=SIZE)
    seconds = clip.timings
    assert {"decode_video", "decode_video_device", "decode_audio"} <= set(seconds)
    assert seconds["decode_video"] >= seconds["decode_video_device"]
    assert seconds["decode"] >= seconds["decode_video"] + seconds["decode_audio"] - 1e-6
    assert torch.equal(clip.frames, video_to_uint8(clip.video)) and clip.frames.dtype == torch.uint8


def test_output_upsampling_is_the_release_upsample_video(networks, codecs, tmp_path):
    """`output_size` resizes the decoded uint8 frames as the release's `upsample_video` does: in
    [0, 1], laid out (c, t, h, w) for F.interpolate, `* 255` truncated to uint8."""
    frames = torch.randint(
        0, 256, (5, 16, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for mode in ("bilinear", "nearest", "bicubic"):
        release = (frames.float() / 255).permute(3, 0, 1, 2)  # t h w c -> c t h w
        align = False if mode != "nearest" else None
        release = F.interpolate(release, size=(40, 60), mode=mode, align_corners=align)
        release = (release.permute(1, 2, 3, 0).clamp(0, 1) * 255).byte()
        assert torch.equal(upsample_frames(frames, (40, 60), mode), release), mode
    pipe = MagiHumanPipeline(networks[0], codecs, device="cpu")
    clip = pipe.generate("a dog barks", seconds=SECONDS, resolution=SIZE, output_size="96x48")
    assert clip.frames.shape == (9, 48, 96, 3) and clip.video.shape == (3, 9, 32, 64)
    assert clip.meta["output_size"] == "96x48" and clip.save(tmp_path / "up.mp4").is_file()
    with pytest.raises(ValueError, match="upsample_mode must be one of"):
        pipe.generate("x", seconds=SECONDS, resolution=SIZE, output_size="96x48", upsample_mode="area")
    with pytest.raises(ValueError, match="positive and even"):
        pipe.generate("x", seconds=SECONDS, resolution=SIZE, output_size="95x48")


def test_sr_guidance_scales_and_the_cfg_trick():
    scales = sr_guidance_scales(20)
    assert scales.shape == (1, 1, 20, 1, 1)
    assert (
        scales[0, 0, :13].flatten().tolist() == [2.0] * 13
        and scales[0, 0, 13:].flatten().tolist() == [3.5] * 7
    )
    assert sr_guidance_scales(5, 1.5).flatten().tolist() == [1.5] * 5  # the trick never raises a scale
    assert sr_guidance_scales(20, trick_value=None).flatten().tolist() == [3.5] * 20


def test_sr_stage_with_cfg_combines_prompt_and_negative_prompt(networks):
    """SR with CFG is `u + s (c - u)` per latent frame against the negative prompt: with s = 1 it is
    the unguided stage, with the release's 3.5 (and its trick) it moves, and the negative prompt is
    used (another negative prompt gives another result)."""
    _, sr = networks
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(1, 48, 3, 2, 4, generator=g), torch.randn(1, 9, 64, generator=g)
    text, negative, other = (torch.randn(1, n, 64, generator=g) for n in (5, 7, 7))

    def run(**kw):
        return sample_super_resolution(
            sr, video, audio, text, None, size=(3, 4, 8), generator=torch.Generator().manual_seed(1), **kw
        )

    plain = run()
    ones = run(negative_text=negative, guidance_scale=torch.ones(1, 1, 3, 1, 1))
    torch.testing.assert_close(ones, plain, atol=1e-5, rtol=1e-5)
    guided = run(negative_text=negative, guidance_scale=sr_guidance_scales(3))
    assert (guided - plain).abs().max() > 1e-3
    assert (run(negative_text=other, guidance_scale=sr_guidance_scales(3)) - guided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="negative prompt"):
        run(guidance_scale=sr_guidance_scales(3))


def test_pipeline_sampling_settings_reach_the_samplers(networks, codecs):
    """Guidance scales, SR steps, re-noise and SR CFG are the pipeline's `Sampling` (the release's
    values by default: the default changes no number); each setting changes the clip it drives."""
    base, sr = networks

    def latents(sampling: Sampling | None, **kw):
        pipe = MagiHumanPipeline(base, codecs, sr, device="cpu", sampling=sampling)
        (video, audio), timer, _ = pipe.generate_latents(
            "a dog barks", seconds=SECONDS, resolution=SIZE, **kw
        )
        return video, audio

    for kw in ({"steps": 32}, {"sr": "128x64"}):
        reference = latents(None, **kw)
        assert all(torch.equal(a, b) for a, b in zip(reference, latents(Sampling(), **kw), strict=True))
    cfg32 = latents(None, steps=32)
    assert not torch.allclose(latents(Sampling(guidance=Guidance(video_high=3.0)), steps=32)[0], cfg32[0])
    assert not torch.allclose(latents(Sampling(guidance=Guidance(audio=2.0)), steps=32)[1], cfg32[1])
    sr_default = latents(None, sr="128x64")[0]
    for setting in ({"sr_steps": 3}, {"sr_noise_value": 100}, {"sr_cfg": True}):
        assert not torch.allclose(latents(Sampling(**setting), sr="128x64")[0], sr_default), setting


def test_infer_py_release_options(tmp_path, monkeypatch, capsys):
    """The release's knobs as infer.py keys (listed by --help, the release's values as defaults) and
    the negative prompt from a file."""
    monkeypatch.syspath_prepend(str(REPO))
    import infer
    from magitrain.errors import UserError

    help_text = infer.help_text()
    for key in ("negative_prompt_file=None", "guidance_video=5.0", "guidance_video_low=2.0",
                "guidance_switch_t=500", "guidance_audio=5.0", "sr_steps=None", "sr_sampler=None",
                "sr_noise_value=220", "sr_cfg=False", "sr_guidance=3.5", "sr_cfg_trick=True",
                "generator_device=cpu", "output_size=None", "upsample_mode=bilinear"):  # fmt: skip
        assert key in help_text, key
    assert infer.sampling(infer.parse([])) == Sampling()
    cfg = infer.parse(["guidance_video=4", "guidance_switch_t=600", "sr_cfg=true", "sr_cfg_trick=false"])
    sampling = infer.sampling(cfg)
    assert sampling.guidance == Guidance(video_high=4.0, switch_t=600)
    assert sampling.sr_cfg and sampling.sr_cfg_trick_value is None
    negative = tmp_path / "negative.txt"
    negative.write_text("blurry, static, hiss, robotic voice\n", encoding="utf-8")
    rows = infer.jobs(infer.parse(["prompt=hi", f"negative_prompt_file={negative}"]))
    assert rows[0]["negative_prompt"] == "blurry, static, hiss, robotic voice"
    with pytest.raises(UserError, match="not both"):
        infer.jobs(infer.parse(["prompt=hi", f"negative_prompt_file={negative}", "negative_prompt=x"]))
    with pytest.raises(UserError, match="no such file"):
        infer.jobs(infer.parse(["prompt=hi", f"negative_prompt_file={tmp_path / 'gone.txt'}"]))
    with pytest.raises(UserError, match="upsample_mode=area"):
        infer.check_output(infer.parse(["upsample_mode=area"]))


def test_the_clip_shape_of_a_floored_size_matches_the_release():
    """480x272 (the release's default base size) floors to 480x256: a 16 x 30 latent grid."""
    assert ClipShape.of(4, "480x272").latent_size == (26, 16, 30)


def test_the_codecs_negative_prompt_file_reaches_every_user_of_the_codecs(tmp_path):
    """`codecs.negative_prompt_file` replaces the codecs' negative prompt, so inference's CFG, the
    DMD-2 teacher and encode_shards' negative.safetensors (all `codecs.text.negative_prompt`) follow it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    file = tmp_path / "release_negative.txt"
    file.write_text("overexposed, static, hiss, reverb, robotic voice, lisp\n", encoding="utf-8")
    cfg = OmegaConf.load(REPO / "conf" / "codecs" / "tiny.yaml")
    assert cfg.negative_prompt_file is None
    assert "negative_prompt_file" in OmegaConf.load(REPO / "conf" / "codecs" / "magihuman.yaml")
    cfg.negative_prompt_file = str(file)
    codecs = instantiate(cfg)
    assert codecs.text.negative_prompt == "overexposed, static, hiss, reverb, robotic voice, lisp"
    torch.testing.assert_close(
        codecs.text.encode_negative(1)[0], codecs.text.encode([file.read_text()[:-1]])[0]
    )
    cfg.negative_prompt_file = str(tmp_path / "gone.txt")
    with pytest.raises(Exception, match="codecs.negative_prompt_file=.*gone.txt: no such file"):
        instantiate(cfg)
