"""The flow-matching recipe's conditioning rules, observed at the real model's inputs."""

from __future__ import annotations

import torch

from magitrain.model import tiny
from magitrain.recipes import FlowMatchingConfig, FlowMatchingModule


def _module(**flow) -> FlowMatchingModule:
    torch.manual_seed(0)
    module = FlowMatchingModule(tiny(), flow=FlowMatchingConfig(**flow))
    module.configure_model()
    return module


def _batch(keys=("a", "b", "c")) -> dict:
    g = torch.Generator().manual_seed(1)
    B = len(keys)
    return {
        "video_latent": torch.randn(B, 48, 3, 4, 6, generator=g),
        "audio_latent": torch.randn(B, 9, 64, generator=g),
        "text_emb": torch.randn(B, 5, 64, generator=g),
        "text_len": torch.tensor([5, 3, 4][:B]),
        "key": list(keys),
    }


def _inputs_seen(module, batch) -> dict:
    seen = {}
    hook = module.model.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(video=args[0], text_len=kwargs["text_len"]), with_kwargs=True
    )
    module.flow_loss(batch)
    hook.remove()
    return seen


def test_image_conditioning_puts_the_clean_frame_in_and_leaves_it_out_of_the_loss():
    module, batch = _module(p_image=1.0, p_drop_text=0.0), _batch()
    seen = _inputs_seen(module, batch)
    assert torch.equal(seen["video"][:, :, 0], batch["video_latent"][:, :, 0])
    assert not torch.equal(seen["video"][:, :, 1], batch["video_latent"][:, :, 1])
    before = module.flow_loss(batch)["video"]

    def scramble_frame0(m, args, out):
        v_video, v_audio = out
        v_video = v_video.clone()
        v_video[:, :, 0] += 100.0
        return v_video, v_audio

    hook = module.model.register_forward_hook(scramble_frame0)
    after = module.flow_loss(batch)["video"]
    hook.remove()
    torch.testing.assert_close(after, before)


def test_without_image_conditioning_every_frame_is_noised_and_scored():
    module, batch = _module(p_image=0.0, p_drop_text=0.0), _batch()
    seen = _inputs_seen(module, batch)
    assert not torch.equal(seen["video"][:, :, 0], batch["video_latent"][:, :, 0])
    assert torch.equal(seen["text_len"], batch["text_len"])


def test_dropped_text_means_no_text_tokens():
    module, batch = _module(p_image=0.0, p_drop_text=1.0), _batch()
    assert torch.equal(_inputs_seen(module, batch)["text_len"], torch.zeros(3, dtype=torch.long))


def test_each_sample_draws_by_its_key_not_its_place_in_the_batch():
    module = _module(p_image=0.5, p_drop_text=0.5)
    batch = _batch()
    order = [2, 0, 1]
    shuffled = {k: (v[order] if torch.is_tensor(v) else [v[i] for i in order]) for k, v in batch.items()}
    a, b = module.flow_loss(batch), module.flow_loss(shuffled)
    torch.testing.assert_close(b["s"], a["s"][order])
    torch.testing.assert_close(b["per_sample"], a["per_sample"][order], atol=1e-5, rtol=1e-5)


def test_the_audio_loss_is_the_mean_over_the_clips_that_have_audio():
    """A clip without audio (`audio_mask` false, data.missing_audio=mask) leaves the audio mean: with
    the video weight 0 the loss of [a, mute b, c] is the loss of [a, c] alone (the draws are per key).
    Catches the silent clip counted in the denominator (`per_sample.mean()`), which scales the audio
    loss by 2/3 here; checked by planting that bug: this test then fails."""
    module = _module(p_image=0.0, p_drop_text=0.0, video_weight=0.0, audio_weight=2.0)
    batch = _batch() | {"audio_mask": torch.tensor([True, False, True])}
    heard = [0, 2]
    pair = {k: (v[heard] if torch.is_tensor(v) else [v[i] for i in heard]) for k, v in batch.items()}
    out, want = module.flow_loss(batch), module.flow_loss(pair)
    assert out["audio"][1] == 0 and out["heard"].tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(out["loss"], want["loss"])
    torch.testing.assert_close(out["loss"], 2.0 * (out["audio"][0] + out["audio"][2]) / 2)
    # no clip with audio: the audio term is 0, not a division by zero
    silent = module.flow_loss(batch | {"audio_mask": torch.zeros(3, dtype=torch.bool)})
    assert silent["loss"] == 0


def test_the_shift_counts_the_noised_tokens_only(monkeypatch):
    """The shifted sigma sampler gets the noised token count, video + audio, not the 640 text
    slots: 3 x (20/2) x (24/2) = 360 video + 9 audio = 369 tokens, where 369 and 1009 (with text)
    give different shifts (the toy batches elsewhere have < 256 tokens, where the shift is 1 either
    way). Catches text counted in (checked by planting it: this test then fails). A clean modality
    or routed tokens (conditional training, TREAD) must keep the count the design gives."""
    from magitrain.flow import training as fm

    module = _module(p_image=0.0, p_drop_text=0.0)
    g = torch.Generator().manual_seed(2)
    batch = {
        "video_latent": torch.randn(2, 48, 3, 20, 24, generator=g),
        "audio_latent": torch.randn(2, 9, 64, generator=g),
        "text_emb": torch.randn(2, 640, 64, generator=g),
        "text_len": torch.tensor([640, 17]),
        "key": ["a", "b"],
    }
    counts = []
    real = fm.sample_sigmas

    def sampler(batch_size, num_tokens, *args, **kwargs):
        counts.append(int(num_tokens))
        return real(batch_size, num_tokens, *args, **kwargs)

    monkeypatch.setattr(fm, "sample_sigmas", sampler)
    module._draw(batch)
    assert counts == [369, 369]
    sampling = module.flow_config.sigma_sampling
    assert sampling.shift(torch.tensor(369.0)) != sampling.shift(torch.tensor(369.0 + 640))
