"""Reference-audio conditioning (issue 27): the sequence, the samplers, training and inference."""

from __future__ import annotations

import pytest
import torch

from magitrain.model import MagiHumanDiT, SequenceLayout, tiny
from magitrain.model.config import tiny_sr1080
from magitrain.model.layout import REF_AUDIO_OFFSET


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_reference_tokens_sit_at_the_released_offset(style):
    plain = SequenceLayout(2, 3, 2, 2, 9, 5, torch.tensor([5, 3]))
    ref = SequenceLayout(2, 3, 2, 2, 9, 5, torch.tensor([5, 3]), 13, torch.tensor([13, 8]))
    p, q = plain.positions(style), ref.positions(style)
    nv, na = plain.n_video, plain.n_audio
    # video, audio and text keep their coordinates; the reference sits between audio and text
    assert torch.equal(q[:, : nv + na], p[:, : nv + na])
    assert torch.equal(q[:, nv + na + 13 :], p[:, nv + na :])
    r = q[:, nv + na : nv + na + 13]
    assert r[..., 0].min() == REF_AUDIO_OFFSET == 1000
    # the clip audio's own spacing (4 latents per latent frame) from the offset on, h = w = 0
    assert torch.equal(r[..., 0] - REF_AUDIO_OFFSET, torch.arange(13.0).expand(2, -1) / 4)
    assert torch.equal(r[..., 1:], torch.zeros_like(r[..., 1:]))
    assert ref.splits == (plain.n_video, 9 + 13, 5)  # routed with the audio weights


def _inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny()
    video = torch.randn(B, cfg.latent_channels, 3, 4, 4, generator=g)
    audio = torch.randn(B, 9, cfg.audio_in_channels, generator=g)
    text = torch.randn(B, 5, cfg.text_in_channels, generator=g)
    ref = torch.randn(B, 30, cfg.audio_in_channels, generator=g)
    return video, audio, text, ref


@pytest.mark.parametrize("config", [tiny, tiny_sr1080])
def test_reference_padding_and_absence_match_one_sample_runs(config):
    """A padded / dropped reference equals each sample run alone (with its reference cut to its
    length, or with none), and the reference changes the output when present."""
    torch.manual_seed(0)
    model = MagiHumanDiT(config()).eval()
    video, audio, text, ref = _inputs()
    ref_len = torch.tensor([30, 0])
    with torch.no_grad():
        torch.set_grad_enabled(True)  # padding is kept (and masked) in a training forward
        batch = model(video, audio, text, ref_audio=ref, ref_len=ref_len)
        torch.set_grad_enabled(False)
        first = model(video[:1], audio[:1], text[:1], ref_audio=ref[:1])
        second = model(video[1:], audio[1:], text[1:])
        alone = model(video[:1], audio[:1], text[:1])
    for out, one in zip(batch, (torch.cat([a, b]) for a, b in zip(first, second, strict=True)), strict=True):
        torch.testing.assert_close(out, one, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[1], alone[1], atol=1e-3)  # the reference is seen
    with pytest.raises(ValueError, match="ref_audio must be"):
        model(video, audio, text, ref_audio=ref[:, :, :3])


# ----- training data ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_shards(tmp_path_factory):
    """Latent clips of 12 latent frames (45 audio latents) under a 9-frame bucket (3 latent frames,
    9 audio latents): 36 latents of each clip's own voice lie past the cut."""
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("voice_shards")
    make_latent_dataset(out, num_samples=8, per_shard=4, latent_shapes=((12, 4, 6),), text_dim=64)
    return out


BUCKETS = [{"height": 64, "width": 96, "frames": 9, "batch_size": 2}]


def _batches(shards, **voice) -> list[dict]:
    from magitrain.data.datamodule import MagiDataModule

    kw = {"voice_reference": voice} if voice else {}
    dm = MagiDataModule(shards=f"{shards}/*.tar", buckets=BUCKETS, num_workers=0, seed=3, **kw)
    dm.setup()
    return [{k: v for k, v in b.items() if k != "_data"} for b in dm.train_dataloader()]


def _stored_audio(shards) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    from magitrain.data.shards import iter_tar

    out = {}
    for tar in sorted(shards.glob("*.tar")):
        for sample in iter_tar(str(tar), 0, None):
            out[sample["__key__"]] = load(sample["latents.safetensors"])["audio_latent"]
    return out


def test_references_are_the_same_clip_outside_the_target_span(long_shards):
    off = _batches(long_shards)
    stored = _stored_audio(long_shards)
    assert all("ref_audio_latent" not in b for b in off)
    on = _batches(long_shards, p=1.0, p_drop=0.0, min_seconds=1.0, max_seconds=1.2)
    lengths = []
    for plain, batch in zip(off, on, strict=True):
        # everything else of the batch is the batch of a run without references
        for k, v in plain.items():
            assert torch.equal(v, batch[k]) if torch.is_tensor(v) else v == batch[k], k
        for key, ref, n in zip(batch["key"], batch["ref_audio_latent"], batch["ref_audio_len"], strict=True):
            audio, n = stored[key], int(n)
            assert 25 <= n <= 30 and not ref[n:].any()  # 1 to 1.2 s, zero-padded
            starts = [s for s in range(9, audio.shape[0] - n + 1) if torch.equal(audio[s : s + n], ref[:n])]
            assert starts, key  # a span of its own clip, past the 9 target latents
            lengths.append(n)
    assert len(set(lengths)) > 1  # lengths are drawn
    dropped = _batches(long_shards, p=1.0, p_drop=1.0)
    assert all(int(b["ref_audio_len"].sum()) == 0 for b in dropped)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    from magitrain.checkpoint import save_official

    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("voice_base") / "base")


RECIPES = {
    "base_pretrain": [],
    "lora_base": ["module.lora.rank=4"],
    "dmd2_distill": ["module.dmd.ttur=1", "module.dmd.voice_reference=true"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_train_with_voice_references(recipe, long_shards, base_ckpt, tmp_path, monkeypatch):
    """Two steps of each recipe kind with references: every network forward (DMD-2: student,
    teacher and critic) gets the batch's reference, the same one."""
    from conftest import compose_train, tiny_run

    from magitrain.launch import train

    seen = []
    forward = MagiHumanDiT.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("ref_audio"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MagiHumanDiT, "forward", spy)
    init = [f"teacher={base_ckpt}"] if recipe == "dmd2_distill" else [f"init={base_ckpt}"]
    voice = ["data.voice_reference.p=1.0", "data.voice_reference.p_drop=0.0"]
    overrides = tiny_run(
        long_shards, f"recipe={recipe}", *init, *RECIPES[recipe], *voice, "trainer.max_steps=2"
    )
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 2
    assert seen and all(r is not None and r.shape[1] >= 25 for r in seen)
    if recipe == "dmd2_distill":  # critic, student and teacher forwards of one step: one reference
        assert len({r.data_ptr() for r in seen[:3]}) == 1
