"""Image-to-video conditioning in every sampler, guidance switching and SR options (no fixtures needed)."""

from __future__ import annotations

import pytest
import torch

from magitrain.flow import (
    Guidance,
    condition_on_image,
    initial_latents,
    sample_base,
    sample_distilled,
    sample_super_resolution,
    upsample_latent,
)

VIDEO, AUDIO = (2, 48, 3, 4, 6), (2, 9, 64)


class Recorder:
    """A smooth stand-in velocity_fn that keeps the latents it was called with."""

    def __init__(self):
        self.videos = []

    def __call__(self, video, audio, text, text_len):
        self.videos.append(video.clone())
        return 0.5 * video + 0.1, 0.5 * audio


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    video, audio = initial_latents(VIDEO, AUDIO, g)
    text = torch.randn(2, 5, 64, generator=g)
    image = torch.randn(2, 48, 1, 4, 6, generator=g)
    return g, video, audio, text, image


def _assert_conditioned(recorder, out_video, image):
    assert recorder.videos and all(torch.equal(v[:, :, :1], image) for v in recorder.videos)
    assert torch.equal(out_video[:, :, :1], image)
    assert not torch.equal(out_video[:, :, 1:2], image)


def test_condition_on_image_overwrites_frame_zero_only():
    _, video, _, _, image = _inputs()
    out = condition_on_image(video, image)
    assert torch.equal(out[:, :, :1], image) and torch.equal(out[:, :, 1:], video[:, :, 1:])
    assert condition_on_image(video, None) is video
    with pytest.raises(ValueError, match="image_latent"):
        condition_on_image(video, image.repeat(1, 1, 2, 1, 1))


def test_distilled_sampler_image_conditioning():
    g, video, audio, text, image = _inputs()
    recorder = Recorder()
    out_video, _ = sample_distilled(recorder, video, audio, text, generator=g, image_latent=image)
    _assert_conditioned(recorder, out_video, image)


def test_base_sampler_image_conditioning():
    _, video, audio, text, image = _inputs()
    recorder = Recorder()
    out_video, _ = sample_base(recorder, video, audio, text, None, -text, steps=4, image_latent=image)
    _assert_conditioned(recorder, out_video, image)
    assert len(recorder.videos) == 8  # cond and uncond per step


def test_sr_sampler_image_conditioning():
    g, video, audio, text, _ = _inputs()
    image = torch.randn(2, 48, 1, 8, 12)
    recorder = Recorder()
    size = (3, 8, 12)
    out = sample_super_resolution(recorder, video, audio, text, size=size, generator=g, image_latent=image)
    assert out.shape == (2, 48, 3, 8, 12) and len(recorder.videos) == 5
    _assert_conditioned(recorder, out, image)


def test_sr_without_renoise_starts_from_the_upsampled_latent():
    g, video, audio, text, _ = _inputs()
    recorder = Recorder()
    sample_super_resolution(recorder, video, audio, text, size=(3, 8, 12), generator=g, noise_value=0)
    assert torch.equal(recorder.videos[0], upsample_latent(video, (3, 8, 12)))


def test_guidance_switches_below_t_500():
    guidance = Guidance()
    assert guidance.video(501) == 5.0 and guidance.video(500) == 2.0 and guidance.audio == 5.0
