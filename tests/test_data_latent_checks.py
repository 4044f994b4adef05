"""Latent samples that break the data contract or hold non-finite values are counted bad samples
that name the shard, key and shapes (never a crash in torch.stack, also after a resume); a listed
shard that does not exist is a user error saying so; the audio mask reaches the loss."""

import json
from collections import Counter

import pytest
import torch
from test_data_raw import tool

from magitrain.data.datamodule import MagiDataModule
from magitrain.data.synthetic import make_latent_dataset
from magitrain.data.writer import latent_sample, write_shard
from magitrain.errors import UserError

BUCKETS = [{"height": 64, "width": 128, "frames": 25, "batch_size": 2}]  # latent T=7, H=4, W=8


def tensors(t=7, h=4, w=8, channels=48, audio=None, audio_width=64, text_dim=16):
    g = torch.Generator().manual_seed(t * 100 + channels)
    return {
        "video_latent": torch.randn(channels, t, h, w, generator=g),
        "audio_latent": torch.randn(audio or 4 * (t - 1) + 1, audio_width, generator=g),
        "text_emb": torch.randn(5, text_dim, generator=g),
    }


BROKEN = {
    "channels47": tensors(channels=47),
    "audio_width63": tensors(audio_width=63),
    "audio_len24": tensors(audio=24),
    "text_width32": tensors(text_dim=32),
    "video_inf": {
        **tensors(),
        "video_latent": tensors()["video_latent"].index_fill(1, torch.tensor([3]), float("inf")),
    },
    "text_nan": {**tensors(), "text_emb": torch.full((5, 16), float("nan"))},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_checks")
    good = [latent_sample(f"good{i}", {"caption": f"good {i}"}, tensors(t=7 + i % 2)) for i in range(6)]
    bad = [latent_sample(key, {"caption": key}, t) for key, t in BROKEN.items()]
    write_shard(out, 0, "latent", good[:3] + bad[:3])
    tar = write_shard(out, 1, "latent", bad[3:] + good[3:])
    # an index that lies about a sample's size (written before the sample was replaced, say)
    index = json.loads(tar.with_suffix(".index.json").read_text())
    swapped = latent_sample("good3", {"caption": "good 3"}, tensors(h=6))
    write_shard(out, 2, "latent", [swapped])
    index2 = json.loads((out / "000002.index.json").read_text())
    index2["samples"][0]["latent_shape"] = [7, 4, 8]
    (out / "000002.index.json").write_text(json.dumps(index2))
    assert index["num_samples"] == 6
    return out


def run(shards, **kw):
    dm = MagiDataModule(mode="latent", shards=str(shards / "*.tar"), buckets=BUCKETS, num_workers=2,
                        shuffle_buffer=2, max_bad_fraction=1.0, **kw)  # fmt: skip
    keys, batches = Counter(), []
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        keys.update(batch["key"])
        batches.append(batch)
    return dm, keys, batches


def test_bad_shapes_and_non_finite_values_are_counted_and_named(shards):
    dm, keys, batches = run(shards)
    assert set(keys) == {f"good{i}" for i in range(6)}
    assert dm.quality.counts == {"bad_shape": 5, "non_finite": 2}
    summary = dm.quality.summary()
    for key in BROKEN:
        assert f"000000.tar:{key}" in summary or f"000001.tar:{key}" in summary
    assert "000002.tar:good3 (video_latent (48, 7, 6, 8)" in summary  # its index lied about its size
    assert "video_latent (47, 7, 4, 8), bucket 64x128x25f needs [48, >=7, 4, 8]" in summary
    assert (
        "text_emb (5, 32), needs [L >= 1, 16]" in summary
        and "audio_latent (24, 64), needs [25, 64]" in summary
    )
    assert "video_latent (48, 7, 4, 8) has 1536 non-finite values" in summary
    for batch in batches:
        assert (
            batch["video_latent"].shape[1:] == (48, 7, 4, 8) and torch.isfinite(batch["video_latent"]).all()
        )


def test_resume_past_bad_samples_continues_exactly(shards):
    _, _, reference = run(shards)
    first = MagiDataModule(mode="latent", shards=str(shards / "*.tar"), buckets=BUCKETS, num_workers=2,
                           shuffle_buffer=2, max_bad_fraction=1.0)  # fmt: skip
    stream = iter(first.train_dataloader())
    for _ in range(2):
        first.on_before_batch_transfer(next(stream), 0)
    resumed = MagiDataModule(mode="latent", shards=str(shards / "*.tar"), buckets=BUCKETS, num_workers=2,
                             shuffle_buffer=2, max_bad_fraction=1.0)  # fmt: skip
    resumed.load_state_dict(first.state_dict())
    rest = [resumed.on_before_batch_transfer(b, 0)["key"] for b in resumed.train_dataloader()]
    assert rest == [b["key"] for b in reference[2:]]


def test_a_missing_shard_is_named(shards, tmp_path):
    with pytest.raises(UserError, match=r"shard .*gone\.tar does not exist"):
        MagiDataModule(mode="latent", shards=[str(shards / "000000.tar"), str(tmp_path / "gone.tar")],
                       buckets=BUCKETS, num_workers=0).setup()  # fmt: skip


def test_clips_without_audio_train_video_only(tmp_path):
    """has_audio=false in a latent sample -> audio_mask False -> that sample's audio loss is zero and
    no gradient flows from its audio output; missing_audio=silence trains it like any other."""
    from magitrain.model import tiny
    from magitrain.recipes import FlowMatchingConfig, FlowMatchingModule

    make_latent_dataset(tmp_path, num_samples=2, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    mute = latent_sample(
        "mute", {"caption": "no sound", "has_audio": False}, tensors(t=3, h=4, w=6, text_dim=64)
    )
    write_shard(tmp_path, 1, "latent", [mute])
    buckets = [{"height": 64, "width": 96, "frames": 9, "batch_size": 3}]
    torch.manual_seed(0)
    module = FlowMatchingModule(tiny(), flow=FlowMatchingConfig(p_image=0.0, p_drop_text=0.0))
    module.configure_model()
    losses, grads = {}, {}
    for policy in ("mask", "silence"):
        dm = MagiDataModule(mode="latent", shards=str(tmp_path / "*.tar"), buckets=buckets, num_workers=0,
                            shuffle=False, missing_audio=policy)  # fmt: skip
        (batch,) = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
        assert batch["audio_mask"].tolist() == [True, True, policy == "silence"]
        out = module.flow_loss(batch)
        losses[policy] = out["audio"]
        if policy == "mask":
            module.zero_grad()

            def keep_audio_grad(model, args, out):
                out[1].register_hook(lambda grad: grads.update(audio=grad))

            hook = module.model.register_forward_hook(keep_audio_grad)
            module.flow_loss(batch)["loss"].backward()
            hook.remove()
            assert grads["audio"][2].abs().sum() == 0 and grads["audio"][0].abs().sum() > 0
    assert losses["mask"][2] == 0 and losses["silence"][2] > 0
    torch.testing.assert_close(losses["mask"][:2], losses["silence"][:2])


def test_text_embeddings_with_zero_rows_are_flagged_by_validate_and_the_loader(tmp_path, capsys):
    """A caption whose rows are all zero (what a batched encoder that assumed right padding wrote
    for a left-padded prompt) is a bad sample `zero_text`: `inspect_shards --validate` lists it and
    the loader skips and counts it. Caught: without the check both pass it on silently."""
    zeroed = tensors()
    zeroed["text_emb"][2:] = 0  # the real rows of a short caption in a left-padded batch
    samples = [latent_sample(f"good{i}", {"caption": "ok"}, tensors()) for i in range(3)]
    write_shard(tmp_path, 0, "latent", [*samples, latent_sample("zeroed", {"caption": "lost"}, zeroed)])
    assert tool("inspect_shards.py", str(tmp_path / "000000.tar"), "--validate", "--json") == 1
    bad = json.loads(capsys.readouterr().out)["bad"]
    assert [(key, reason) for _, key, reason in bad] == [
        ("zeroed", "zero_text: text_emb has 3 of 5 rows all zero")
    ]
    dm, keys, _ = run(tmp_path)
    assert set(keys) == {"good0", "good1", "good2"} and dm.quality.counts == {"zero_text": 1}


def test_the_logged_audio_loss_is_the_mean_over_the_clips_that_have_audio(tmp_path):
    """A real run on [two clips + one without audio] logs train/loss_audio as the audio loss summed
    over the step's clips / 2 (the clips with audio), and train/loss with it. Catches the logging
    window dividing by all 3 clips (checked by planting it: this test then fails)."""
    import csv

    from conftest import compose_train, tiny_run

    from magitrain.launch import train
    from magitrain.recipes import FlowMatchingModule

    make_latent_dataset(tmp_path, num_samples=2, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    mute = latent_sample("mute", {"caption": "no", "has_audio": False}, tensors(t=3, h=4, w=6, text_dim=64))
    write_shard(tmp_path, 1, "latent", [mute])
    overrides = tiny_run(tmp_path, "trainer.max_steps=1", "trainer.log_every_n_steps=1", "data.shuffle=false")
    overrides = [o.replace("batch_size: 2", "batch_size: 3") for o in overrides]
    seen = []
    original = FlowMatchingModule.flow_loss
    FlowMatchingModule.flow_loss = lambda self, batch: seen.append(original(self, batch)) or seen[-1]
    try:
        train(compose_train([*overrides, "module.flow.audio_weight=0.5"], tmp_path / "run"))
    finally:
        FlowMatchingModule.flow_loss = original
    (out,) = seen
    assert out["heard"].tolist() == [1.0, 1.0, 0.0]
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("train/loss_audio")]
    audio, video = out["audio"].sum().item() / 2, out["video"].mean().item()
    assert float(row["train/loss_audio"]) == pytest.approx(audio, rel=1e-5)
    assert float(row["train/loss"]) == pytest.approx(video + 0.5 * audio, rel=1e-5)
    assert float(row["train/loss"]) == pytest.approx(out["loss"].item(), rel=1e-5)
