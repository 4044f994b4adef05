"""Real speech clips as real footage has them: audio shorter or longer than the video, 24 and 30 fps,
a vertical clip, a sidecar wav, no audio track, a non-Latin caption, an AAC track that starts late,
and broken files. make_shards -> inspect_shards --validate -> the raw loader -> encode_shards with
the tiny codecs -> a few training steps of the tiny model."""

import contextlib
import io
import json
import random
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import compose_train
from test_data_raw import tool

from magitrain.data.buckets import Bucket
from magitrain.data.collate import collate_raw
from magitrain.data.datamodule import MagiDataModule
from magitrain.data.decode import RawOptions, decode_raw
from magitrain.data.encode import encode_raw_batch
from magitrain.data.index import read_index
from magitrain.data.shards import iter_tar
from magitrain.data.span import AVPolicy
from magitrain.data.synthetic import make_clip, make_speech_clip

# name: (speech, voice, make_speech_clip options); the caption is "NAME: SPEECH"
CLIPS = {
    "en_short": ("Hello, this clip has less audio than video.", "en", dict(seconds=3.0, audio_seconds=1.4)),
    "de_long": ("Guten Morgen, die Tonspur ist laenger.", "de", dict(seconds=1.6, audio_seconds=2.4, fps=24)),
    "fr_30fps": (
        "Bonjour, trente images par seconde, et la voix continue jusqu a la fin.",
        "fr",
        dict(seconds=2.2, audio_seconds=2.3, fps=30),
    ),
    "ja_vertical": ("こんにちは", "ja", dict(seconds=1.4, audio_seconds=1.4, size=(112, 64))),
    "es_sidecar": ("Hola, el audio va en un archivo aparte.", "es", dict(seconds=1.6, audio_seconds=1.6)),
    "zh_caption": ("你好，世界。今天天气很好。", "cmn", dict(seconds=1.4, audio_seconds=1.4)),
    "en_offset": (
        "This track starts half a second late.",
        "en",
        dict(seconds=2.4, audio_seconds=1.5, audio_start=0.5),
    ),
}
BROKEN = ("truncated", "empty", "notavideo")
BUCKETS = [
    {"height": 32, "width": 64, "seconds": 1, "batch_size": 2},
    {"height": 32, "width": 64, "seconds": 2, "batch_size": 2},
    {"height": 64, "width": 32, "seconds": 1, "batch_size": 1},
]


@pytest.fixture(scope="session")
def speech(tmp_path_factory):
    """The clips folder, its raw shards and what make_shards wrote to stderr."""
    clips = tmp_path_factory.mktemp("speech_clips")
    for i, (name, (text, voice, options)) in enumerate(CLIPS.items()):
        wav = clips / f"{name}.wav" if name == "es_sidecar" else None
        make_speech_clip(clips / f"{name}.mp4", text, voice, wav_path=wav, seed=i, **options)
        (clips / f"{name}.json").write_text(json.dumps({"caption": f"{name}: {text}", "language": voice}))
    make_clip(clips / "silent.mp4", seconds=1.4, size=(64, 112), audio=None, seed=9)
    (clips / "silent.json").write_text(json.dumps({"caption": "silent: no audio track"}))
    good = (clips / "en_short.mp4").read_bytes()
    (clips / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "notavideo.mp4").write_text("this is a caption file, not a video\n")
    for name in BROKEN:
        (clips / f"{name}.json").write_text(json.dumps({"caption": name}))
    shards = tmp_path_factory.mktemp("speech_shards")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        tool("make_shards.py", str(clips), str(shards), "--max-count", "4", "--workers", "2")
    return clips, shards, err.getvalue()


def names(batch) -> list[str]:
    return [caption.split(":")[0] for caption in batch["caption"]]


def test_broken_files_are_reported_by_name_and_every_good_clip_validates(speech, capsys):
    _, shards, err = speech
    for name in BROKEN:
        assert f"{name}.mp4" in err
    capsys.readouterr()
    assert tool("inspect_shards.py", str(shards / "*.tar"), "--validate", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == [] and report["summary"]["samples"] == len(CLIPS) + 1
    rows = {
        r["key"]: r
        for url in shards.glob("*.tar")
        for r in read_index(str(url), str(url)[:-4] + ".index.json").rows
    }
    starts = sorted(round(r.get("audio_start", -1), 2) for r in rows.values())
    assert starts[0] == -1 and starts[-1] == pytest.approx(
        0.45, abs=0.01
    )  # the silent clip; the late AAC track


def test_every_good_clip_arrives_in_the_longest_bucket_its_common_span_fills(speech):
    _, shards, _ = speech
    dm = MagiDataModule(
        mode="raw", shards=str(shards / "*.tar"), buckets=BUCKETS, num_workers=2, shuffle_buffer=2
    )
    frames, masks, shapes = {}, {}, {}
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        for i, name in enumerate(names(batch)):
            assert name not in frames
            frames[name], masks[name] = batch["video"].shape[2], bool(batch["audio_mask"][i])
            shapes[name] = tuple(batch["video"].shape[-2:])
            loud = batch["audio"][i].abs().amax()
            assert (loud > 0.05) if masks[name] else (loud == 0), name
            assert batch["audio"].shape[-1] == batch["video"].shape[2] * 2048  # F/25 s of audio
    assert sorted(frames) == sorted([*CLIPS, "silent"])
    assert dm.quality.bad == 0 and dm.dataset.unplanned == {}
    # 3 s of video but 1.4 s of speech: the 1 s bucket, not the 2 s one its video suggests
    assert frames["en_short"] == 25 and frames["fr_30fps"] == 49 and frames["de_long"] == 25
    assert shapes["ja_vertical"] == (64, 32) and shapes["en_short"] == (32, 64)
    assert masks == {**dict.fromkeys(CLIPS, True), "silent": False}
    assert dm.quality.notes == {"audio_masked": 1}


def sample_of(shards: Path, name: str) -> tuple[dict, dict]:
    for url in sorted(shards.glob("*.tar")):
        rows = {r["key"]: r for r in read_index(str(url), str(url)[:-4] + ".index.json").rows}
        for sample in iter_tar(str(url)):
            if json.loads(sample["json"])["caption"].startswith(name + ":"):
                return sample, rows[sample["__key__"]]
    raise KeyError(name)


def onset(audio: torch.Tensor) -> float:
    """Seconds until the first sample louder than -34 dB."""
    return float(np.nonzero(audio[0].abs().numpy() > 0.02)[0][0]) / 51200


def test_a_late_aac_track_lands_where_it_plays(speech):
    sample, row = sample_of(speech[1], "en_offset")
    bucket = Bucket(32, 64, 25, 1)
    cropped = decode_raw(sample, row, bucket, RawOptions(), random.Random(0))
    padded = decode_raw(
        sample, row, bucket, RawOptions(policy=AVPolicy("pad_silence", 1.0)), random.Random(0)
    )
    # espeak starts speaking ~14 ms into its wav; the track starts 0.5 s after the first frame
    assert 0.5 < onset(padded["audio"]) < 0.53 and padded["note"] == "audio_padded"
    assert onset(cropped["audio"]) < 0.06  # crop: the span starts at frame 12 (0.48 s), with the track


def test_policies_decide_which_clips_are_planned(speech):
    shards = str(speech[1] / "*.tar")
    drop = MagiDataModule(mode="raw", shards=shards, buckets=BUCKETS, num_workers=0, av_mismatch="drop")
    drop.setup()
    assert drop.dataset.unplanned == {"av_mismatch": 3}  # en_short, de_long (0.8 s extra audio), en_offset
    no_sound = MagiDataModule(mode="raw", shards=shards, buckets=BUCKETS, num_workers=0, missing_audio="drop")
    no_sound.setup()
    assert no_sound.dataset.unplanned == {"missing_audio": 1}
    pad = MagiDataModule(
        mode="raw", shards=shards, buckets=BUCKETS, num_workers=0, av_mismatch="pad_silence", av_tolerance=2.0
    )
    got = {}
    for batch in pad.train_dataloader():
        batch = pad.on_before_batch_transfer(batch, 0)
        got.update(dict.fromkeys(names(batch), batch["video"].shape[2]))
    assert got["en_short"] == 49 and pad.quality.notes["audio_padded"] >= 2  # en_short and en_offset


def test_training_audio_tokens_equal_inference_tokens(speech):
    """A bucket of F frames loads the F/25 s they cover: its F audio latents are those the audio
    codec gives for the same clip sized as inference sizes it (ClipShape), token for token."""
    from magitrain.codecs.tiny import build_tiny_codecs
    from magitrain.inference import ClipShape

    sample, row = sample_of(speech[1], "fr_30fps")
    bucket = Bucket(32, 64, 25, 1)
    codecs = build_tiny_codecs()
    decoded = decode_raw(sample, row, bucket, RawOptions(), random.Random(0))
    train = encode_raw_batch(collate_raw([decoded], 51200), codecs)
    clip = ClipShape.of((bucket.frames - 1) / 25, "64x32")
    assert (clip.frames, clip.audio_tokens, clip.latent_size) == (25, 25, train["video_latent"].shape[2:])
    with av.open(io.BytesIO(sample["mp4"])) as container:  # the whole track at its own rate
        frames = list(container.decode(audio=0))
    rate, wave = frames[0].sample_rate, np.concatenate([f.to_ndarray() for f in frames], axis=1)
    reference = codecs.audio.encode(torch.from_numpy(wave)[None].float(), rate, num_frames=clip.audio_tokens)[
        0
    ]
    got = train["audio_latent"][0]
    assert got.shape == reference.shape == (25, 64)
    error = ((got - reference).norm(dim=-1) / reference.norm(dim=-1)).max()
    # the loader used before loaded (F-1)/25 s and padded: its last token encoded zeros
    short = decoded["audio"][None, :, : (bucket.frames - 1) * 2048]
    old = codecs.audio.encode(torch.nn.functional.pad(short, (0, 2048)), 51200, num_frames=bucket.frames)[0]
    old_error = (old - reference)[-1].norm() / reference[-1].norm()
    assert error < 5e-3 and old_error > 2 * error and old_error > 1e-2, (error, old_error)


def test_encode_shards_with_tiny_codecs_then_train_a_few_steps(speech, tmp_path):
    from magitrain.launch import train

    latent = tmp_path / "latent"
    tool("encode_shards.py", str(speech[1]), str(latent), "codecs=tiny", "--bucket", "32x64:1",
         "--bucket", "64x32:1", "--dtype", "float32", "--batch-size", "2")  # fmt: skip
    rows = [
        r
        for url in sorted(latent.glob("*.tar"))
        for r in read_index(str(url), str(url)[:-4] + ".index.json").rows
    ]
    assert len(rows) == len(CLIPS) + 1 and Counter(r["has_audio"] for r in rows) == {True: 7, False: 1}
    # DMD-2's negative prompt, encoded once beside the latent shards (data/prompts.py)
    from hydra.utils import instantiate

    from magitrain.data.prompts import read_negative

    emb, length = instantiate(compose_train(["codecs=tiny"], tmp_path / "cfg").codecs).text.encode_negative(1)
    torch.testing.assert_close(read_negative(latent / "negative.safetensors", 64), emb[0, : int(length[0])])
    assert {tuple(r["latent_shape"]) for r in rows} == {(7, 2, 4), (7, 4, 2)} and {
        r["audio_len"] for r in rows
    } == {25}
    overrides = [
        "model=tiny",
        "trainer=cpu",
        "debug=fast",
        "callbacks.progress_bar=null",
        f"data.shards={latent}/*.tar",
        "data.num_workers=0",
        "data.buckets=[{height: 32, width: 64, frames: 25, batch_size: 2},"
        " {height: 64, width: 32, frames: 25, batch_size: 1}]",
    ]
    trainer = train(compose_train(overrides, tmp_path / "run"))
    assert trainer.global_step == 3 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_random_offsets_cut_the_audio_at_the_drawn_first_frame(speech):
    """`random_offset=True` on a real speech clip whose track starts 0.5 s late (its span starts at
    frame 12): over several seeds the drawn first frame (span start + rng.randrange) varies, and
    the decoded audio is the track from that frame's time, first / 25 s, found by matching it
    against the whole decoded track frame by frame (speech does not repeat). Catches the audio cut
    at the span start (or at frame 0) instead of the drawn offset; checked by planting the former:
    this test then fails."""
    from magitrain.data.decode import read_audio
    from magitrain.data.span import clip_span

    sample, row = sample_of(speech[1], "en_offset")
    bucket, rate = Bucket(32, 64, 25, 1), 51200
    span = clip_span(row, AVPolicy())
    assert span.first == 12 and span.frames > bucket.frames + 4
    step = rate // 25
    whole = span.first + span.frames
    track, _ = read_audio(sample["mp4"], True, 0.0, whole * step, rate)  # from the first video frame
    firsts = []
    for seed in range(6):
        decoded = decode_raw(sample, row, bucket, RawOptions(random_offset=True), random.Random(seed))
        first = span.first + random.Random(seed).randrange(span.frames - bucket.frames + 1)
        audio = decoded["audio"][0]
        errors = [
            (audio - track[0, k * step : k * step + audio.shape[-1]]).abs().mean().item()
            for k in range(whole - bucket.frames + 1)
        ]
        assert min(range(len(errors)), key=errors.__getitem__) == first, (seed, first, errors)
        assert errors[first] < 0.1 * sorted(errors)[1], (seed, errors)  # an unambiguous match
        firsts.append(first)
    assert len(set(firsts)) >= 3, firsts
