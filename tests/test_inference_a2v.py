"""Audio-driven video (`audio=FILE`, image+audio too) and video-to-audio (`video=FILE`) at tiny size:
the given modality stays clean in every sampler, the SR stage gets it mixed as released, the clip
follows its length and the mp4 carries it; bad files give named errors."""

from __future__ import annotations

import json
import logging

import av
import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from conftest import REPO
from torch._dynamo.utils import counters

from magitrain.checkpoint import save_official
from magitrain.codecs import build_tiny_codecs
from magitrain.codecs.media import write_mp4
from magitrain.data.synthetic import moving_pattern, speak, write_wav
from magitrain.errors import UserError
from magitrain.flow import gaussian, initial_latents, sample_base, sample_distilled
from magitrain.inference import ClipShape, MagiHumanPipeline, StageTimer
from magitrain.inference.given import clip_frames, read_video_file
from magitrain.model import MagiHumanDiT, tiny

SIZE, SR_SIZE = "64x32", "128x64"
VIDEO, AUDIO = (1, 48, 3, 2, 4), (1, 9, 64)


class Recorder:
    """A stand-in velocity_fn that keeps every (video, audio) it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, video, audio, text, text_len):
        self.calls.append((video.clone(), audio.clone()))
        return 0.5 * video + 0.1, 0.5 * audio - 0.1


@pytest.fixture(scope="module")
def pipe() -> MagiHumanPipeline:
    torch.manual_seed(0)
    model = MagiHumanDiT(tiny()).eval()
    torch.manual_seed(1)
    sr_model = MagiHumanDiT(tiny()).eval()
    return MagiHumanPipeline(model, build_tiny_codecs(seed=0), sr_model, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """0.4 s of real speech (espeak-ng; a chirp without it), stereo at 22.05 kHz: (path, [2, S], rate)."""
    rate = 22050
    try:
        wave, rate = speak("Hello there, how are you?")
        start = int(np.argmax(np.abs(wave[0]) > 0.05))  # past the leading silence
        wave = wave[:, start : start + int(0.4 * rate)]
    except RuntimeError:
        t = np.arange(int(0.4 * rate)) / rate
        wave = (0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)).astype(np.float32)[None]
    stereo = np.concatenate([wave, 0.8 * wave])  # any channel count: the model hears their mix
    path = tmp_path_factory.mktemp("media") / "speech.wav"
    write_wav(path, stereo, rate)
    return path, torch.from_numpy(stereo), rate


@pytest.fixture(scope="module")
def clip_30fps(tmp_path_factory):
    """0.4 s of moving pattern at 30 fps (12 frames), 64x32, no audio track."""
    path = tmp_path_factory.mktemp("media") / "clip30.mp4"
    write_mp4(path, torch.from_numpy(moving_pattern(12, 32, 64, seed=3)), fps=30)
    return path


@pytest.mark.parametrize("sampler", ["distilled", "base"])
@pytest.mark.parametrize("given", ["audio", "video"])
def test_the_clean_modality_is_bit_identical_at_every_step(sampler, given):
    """a2v holds the audio, v2a the video, in every model call and in the result; the other modality
    is denoised. Catches a sampler updating the given latent (the release's distilled a2v path)."""
    g = torch.Generator().manual_seed(0)
    video, audio = initial_latents(VIDEO, AUDIO, g)
    clean = torch.randn(VIDEO if given == "video" else AUDIO, generator=g)
    text = torch.randn(1, 5, 64, generator=g)
    recorder, kwargs = Recorder(), {f"clean_{given}": clean}
    if sampler == "distilled":
        out = sample_distilled(recorder, video, audio, text, generator=g, **kwargs)
    else:
        out = sample_base(recorder, video, audio, text, None, -text, steps=4, **kwargs)
    held, free = (0, 1) if given == "video" else (1, 0)
    assert len(recorder.calls) == 8  # 8 distilled steps; 4 UniPC steps x (prompt, negative prompt)
    assert all(torch.equal(call[held], clean) for call in recorder.calls) and torch.equal(out[held], clean)
    moved = [call[free] for call in recorder.calls]
    assert not torch.equal(moved[0], moved[-1]) and not torch.equal(out[free], moved[0])


def test_the_sr_stage_gets_the_given_audio_mixed_as_released(pipe, speech):
    """Base + SR with a clean audio latent: every SR forward sees `0.7 eps + 0.3 audio` of the given
    audio (eps: the SR stage's draw, after the base stage's in the released order), and the clip's
    audio is the given latent. Catches the SR stage getting the base stage's generated audio."""
    clip = ClipShape.of(0.32, SIZE)
    given = torch.randn(clip.audio_latent_shape(), generator=torch.Generator().manual_seed(5))
    text = pipe.encode_prompt("a man speaks", guidance=False)
    seen = []
    hook = pipe.sr_model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        options = dict(steps=2, sampler="distilled", seed=4, sr_clip=clip.with_resolution(SR_SIZE))
        video, audio = pipe.sample(text, clip, StageTimer("cpu"), clean_audio=given, **options)
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(4)  # replay: initial latents, 2 x (video, audio) steps, SR re-noise
    initial_latents(clip.video_latent_shape(), clip.audio_latent_shape(), g)
    for shape in [clip.video_latent_shape(), clip.audio_latent_shape()] * 2 + [tuple(video.shape)]:
        gaussian(shape, g, "cpu")
    eps = gaussian(clip.audio_latent_shape(), g, "cpu")
    assert len(seen) == 5 and all(torch.equal(a, 0.7 * eps + (1 - 0.7) * given) for a in seen)
    assert torch.equal(audio, given) and video.shape == (1, 48, 3, 4, 8)


def test_compiled_steps_equal_eager_with_a_clean_modality(pipe):
    """compile=step (dynamo's eager backend: the trace, no C++ build) with a clean audio (distilled)
    or video (UniPC + CFG): the compiled step is unchanged (the clean latent is a tensor argument,
    held outside the graph), traces without a break, equals eager, and returns the clean latent."""
    compiled = MagiHumanPipeline(
        pipe.model, pipe.codecs, device="cpu", precision="fp32", compile="step", compile_backend="eager"
    )
    clip, g = ClipShape.of(0.32, SIZE), torch.Generator().manual_seed(6)
    clean = {"audio": torch.randn(clip.audio_latent_shape(), generator=g)}
    clean["video"] = torch.randn(clip.video_latent_shape(), generator=g)
    counters.clear()
    for sampler, given in (("distilled", "audio"), ("base", "video")):
        text = pipe.encode_prompt("a man speaks", guidance=sampler == "base")
        options = {"steps": 2, "sampler": sampler, "seed": 1, f"clean_{given}": clean[given]}
        want = pipe.sample(text, clip, StageTimer("cpu"), **options)
        got = compiled.sample(text, clip, StageTimer("cpu"), **options)
        for g_, w in zip(got, want, strict=True):
            torch.testing.assert_close(g_, w, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[0 if given == "video" else 1], clean[given])
    assert not counters["graph_break"]


def _mp4_audio(path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].sample_rate
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1), rate


def _correlation(got: np.ndarray, want: np.ndarray, lags: int = 1025) -> float:
    """The best normalised correlation over lags up to one AAC frame (the encoder's priming)."""
    best = 0.0
    for lag in range(lags):
        a, b = got[lag : lag + want.size], want[: got.size - lag]
        best = max(best, float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
    return best


def test_image_and_audio_to_video_follows_and_carries_the_given_audio(pipe, speech, tmp_path):
    """0.4 s of stereo speech: 11 frames, 3 latent frames (9 pictures), the audio latent is the
    codec's encoding of it, frame 0 is the image, and the mp4's track is the given audio (correlation
    > 0.99 after AAC); `audio_out="decoded"` writes the VAE round trip instead."""
    path, stereo, rate = speech
    image = torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = pipe.generate("a man speaks", audio=path, image=image, resolution=SIZE, seed=1)
    (video, audio), clip = result.latents, ClipShape.of(0.4, SIZE)
    assert result.meta["seconds"] == pytest.approx(0.4) and result.meta["frames"] == clip.frames == 11
    assert video.shape == (1, 48, 3, 2, 4) and result.frames.shape[0] == 9
    wave, _, _ = pipe.read_given(path, None, None)  # the channels' mix at the codec's 51.2 kHz
    assert _correlation(wave[0].numpy(), AF.resample(stereo.mean(0), rate, 51200).numpy(), lags=1) > 0.999
    codec = pipe.codecs.audio
    assert torch.equal(audio, codec.encode(wave[None], 51200, num_frames=11))
    torch.testing.assert_close(video[:, :, :1], pipe.encode_image(image, clip))

    track, out_rate = _mp4_audio(result.save(tmp_path / "a2v.mp4"))
    want = AF.resample(stereo.mean(0), rate, out_rate).numpy()
    assert out_rate == 44100 and track.shape[0] == 2 and _correlation(track[0], want) > 0.99
    assert json.loads((tmp_path / "a2v.json").read_text())["audio"] == str(path)

    decoded = pipe.generate("a man speaks", audio=path, resolution=SIZE, seed=1, audio_out="decoded")
    assert torch.equal(decoded.audio, codec.decode(decoded.latents[1])[0][0])
    assert _correlation(decoded.audio[0].numpy(), want) < 0.9  # the random tiny VAE's round trip


def _write_flac(path, stereo: torch.Tensor, rate: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.layout = "stereo"
        pcm = (stereo.T.reshape(1, -1).numpy() * 32767).astype(np.int16)  # interleaved s16
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


def test_audio_files_are_read_whole_or_cut_to_seconds(pipe, speech, tmp_path):
    """wav, flac and AAC in an mp4 (m4a) container give the same 0.4 s: the channels' mix at
    51.2 kHz; `seconds` cuts it. Catches a reader that takes one format, one channel or a wrong rate."""
    path, stereo, rate = speech
    wave, _, seconds = pipe.read_given(path, None, 0.2)
    assert wave.shape == (1, round(0.2 * 51200)) and seconds == pytest.approx(0.2)
    _write_flac(tmp_path / "speech.flac", stereo, rate)
    black = torch.zeros(2, 32, 64, 3, dtype=torch.uint8)
    write_mp4(tmp_path / "speech.mp4", black, audio=stereo, sample_rate=rate)  # AAC, as in an m4a
    want = AF.resample(stereo.mean(0), rate, 51200).numpy()
    for file in (path, tmp_path / "speech.flac", tmp_path / "speech.mp4"):
        wave, _, seconds = pipe.read_given(file, None, None)
        assert seconds == pytest.approx(0.4, abs=0.05) and _correlation(wave[0].numpy(), want) > 0.99, file


def test_video_to_audio_keeps_the_given_pictures(pipe, clip_30fps, tmp_path, caplog):
    """A 30 fps clip of 0.4 s: resampled to 25 fps with a log line (10 frames), its video latent held
    clean, the audio generated (10 latent frames), and the mp4 shows the given pictures."""
    with caplog.at_level(logging.INFO, logger="magitrain"):
        result = pipe.generate("a dog barks", video=clip_30fps, resolution=SIZE, seed=2)
    assert "is 30 fps: resampled to 25 fps" in caplog.text
    clip = ClipShape(64, 32, 10)
    given = clip_frames(read_video_file(clip_30fps), clip)
    assert result.meta["frames"] == 10 and given.shape == (9, 32, 64, 3)
    video, audio = result.latents
    pixels = given.permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    assert torch.equal(video, pipe.codecs.video.encode(pixels)) and audio.shape == (1, 10, 64)
    assert torch.equal(result.frames, given)
    with av.open(str(result.save(tmp_path / "v2a.mp4"))) as container:
        shown = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert shown.shape == (9, 32, 64, 3) and np.abs(shown.astype(int) - given.numpy()).mean() < 6


def test_bad_inputs_give_named_errors(pipe, speech, clip_30fps, tmp_path):
    def fails(match: str, **options):
        with pytest.raises(UserError, match=match):
            pipe.generate_latents("x", resolution=SIZE, **options)

    fails(r"audio=.*nowhere.wav: no such file", audio=tmp_path / "nowhere.wav")
    (tmp_path / "junk.mp3").write_bytes(b"not audio at all" * 64)
    fails(r"audio=.*junk.mp3: not a readable audio file", audio=tmp_path / "junk.mp3")
    write_wav(tmp_path / "silent.wav", np.zeros((1, 8000), np.float32), 16000)
    fails(r"audio=.*silent.wav is silent", audio=tmp_path / "silent.wav")
    write_wav(tmp_path / "blip.wav", np.full((1, 400), 0.5, np.float32), 16000)
    fails(r"audio=.*blip.wav: 0.025 s of audio, shorter than one latent frame", audio=tmp_path / "blip.wav")
    write_mp4(tmp_path / "one.mp4", torch.from_numpy(moving_pattern(1, 32, 64, seed=0)))
    fails(r"video=.*one.mp4: 1 frame\(s\)", video=tmp_path / "one.mp4")
    fails(r"video=.*speech.wav: not a readable video file \(no video stream\)", video=speech[0])
    fails("audio=FILE .* or video=FILE .*, not both", audio=speech[0], video=clip_30fps)
    fails("keeps the given pictures: sr=128x64 has no video to refine", video=clip_30fps, sr=SR_SIZE)
    fails(
        "image= has no frame left to set", video=clip_30fps, image=torch.zeros(3, 32, 64, dtype=torch.uint8)
    )


def test_infer_py_takes_audio_and_video_rows_of_a_prompts_file(speech, clip_30fps, tmp_path, monkeypatch):
    """infer.py (in this process) with a .jsonl whose rows give `audio` and `video`: an a2v and a v2a
    clip, their lengths from the files; `audio_out` is checked before any network loads."""
    monkeypatch.syspath_prepend(str(REPO))
    import infer

    torch.manual_seed(0)
    ckpt = save_official(MagiHumanDiT(tiny()), tmp_path / "tiny")
    rows = [
        {"prompt": "a man speaks", "audio": str(speech[0])},
        {"prompt": "a dog", "video": str(clip_30fps)},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    common = [f"ckpt={ckpt}", "model=tiny", "codecs=tiny", f"resolution={SIZE}", "device=cpu"]
    with pytest.raises(UserError, match="audio_out=vae: expected one of given, decoded"):
        infer.main([*common, "prompt=x", f"audio={speech[0]}", "audio_out=vae"])
    infer.main([*common, f"prompts={tmp_path / 'rows.jsonl'}", f"out={tmp_path / 'out' / 'c.mp4'}"])
    first, second = (json.loads((tmp_path / "out" / f"c_00{i}.json").read_text()) for i in (0, 1))
    assert (first["audio"], first["frames"], second["video"], second["frames"]) == (
        str(speech[0]),
        11,
        str(clip_30fps),
        10,
    )


def test_validation_samples_a_prompt_driven_by_a_given_sound(latent_shards, speech, tmp_path):
    """`callbacks.validation.audio`: the first prompt's clip is driven by the given sound (cut to the
    validation's 0.32 s, its mp4 carrying it), the second is text to video; a list of another length
    than the prompts is refused."""
    from conftest import compose_train, tiny_run

    from magitrain.callbacks import Validation
    from magitrain.launch import train

    path, stereo, rate = speech
    overrides = tiny_run(
        latent_shards, "trainer.max_steps=1", "codecs=tiny", "callbacks=validation",
        "callbacks.validation.every_n_steps=1", "callbacks.validation.prompts=['A man speaks','A dog barks']",
        f"callbacks.validation.audio=['{path}',null]", "callbacks.validation.seconds=0.32",
        "callbacks.validation.resolution=64x32",
    )  # fmt: skip
    train(compose_train(overrides, tmp_path))
    step = tmp_path / "validation" / "step00000001"
    (given, given_rate), (text, text_rate) = (_mp4_audio(step / f"sample{i}.mp4") for i in (0, 1))
    assert given.shape == text.shape and given_rate == text_rate  # 9 frames, as the text's (0.4 s: 11)
    want = AF.resample(stereo.mean(0), rate, given_rate).numpy()[: round(0.32 * given_rate)]  # cut to seconds
    assert _correlation(given[0], want) > 0.99
    assert _correlation(text[0], AF.resample(stereo.mean(0), rate, text_rate).numpy()) < 0.5
    with pytest.raises(ValueError, match=r"callbacks.validation.audio has 1 entries for 2 prompts"):
        Validation(["a", "b"], audio=[str(path)])
