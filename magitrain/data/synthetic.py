"""Synthetic data for tests and the demo: real mp4 clips (moving patterns + AAC tone, noise or real
speech from espeak-ng) with caption json, and latent shards of random tensors in the data
contract's shapes.

Every clip is a genuine H.264/AAC mp4 written by PyAV, so the whole data path (probe, shard,
decode, resize, audio) runs on it exactly as on real data; only the content is synthetic.
Speech clips can have audio shorter or longer than the video and an AAC track that starts late,
as real footage does.

    python -m magitrain.data.synthetic OUT_DIR --num-clips 8 --seconds 2 --size 64x128
"""

import argparse
import json
import shutil
import subprocess
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from magitrain.codecs.media import write_mp4
from magitrain.data.prompts import save_negative, write_negative
from magitrain.data.writer import latent_sample, write_shard

LANGUAGES = ("en", "zh", "ja", "ko", "de", "fr", "es", "yue")


def moving_pattern(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """`[F, H, W, 3]` uint8: a drifting colour gradient with a bouncing square, distinct per seed."""
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0.3, 1.0, size=3)
    t = np.arange(num_frames)[:, None, None] / 25.0
    y = np.arange(height)[None, :, None] / height
    x = np.arange(width)[None, None, :] / width
    base = 0.5 + 0.5 * np.sin(2 * np.pi * (x + y + 0.5 * t))
    frames = (base[..., None] * tint * 255).astype(np.uint8)
    side = max(4, min(height, width) // 4)
    speed = rng.uniform(10, 30)
    for i in range(num_frames):
        top = int(abs((i * speed / 25 * 3) % (2 * (height - side)) - (height - side)))
        left = int(abs((i * speed) % (2 * (width - side)) - (width - side)))
        frames[i, top : top + side, left : left + side] = 255
    return frames


def synth_audio(seconds: float, sample_rate: int, kind: str, seed: int) -> np.ndarray:
    """`[1, S]` float32 in [-1, 1]: a tone whose pitch depends on the seed, or white noise."""
    n = round(seconds * sample_rate)
    if kind == "tone":
        freq = 220.0 * 2 ** ((seed % 12) / 12)
        return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / sample_rate)).astype(np.float32)[None]
    if kind == "noise":
        return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)[None]
    raise ValueError(f"audio kind must be 'tone' or 'noise', got {kind!r}")


def write_jpg(path: Path, image: np.ndarray) -> None:
    """One [H, W, 3] uint8 frame as a JPEG, through PyAV's mjpeg encoder."""
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("mjpeg")
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuvj420p"
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM wav of `[C, S]` float audio (the stdlib writer: no extra dependency)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").T.copy()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(audio.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def make_clip(
    path: str | Path,
    seconds: float = 2.0,
    size: tuple[int, int] = (64, 128),
    fps: float = 25.0,
    audio: str | None = "tone",
    sample_rate: int = 44100,
    wav_path: str | Path | None = None,
    seed: int = 0,
) -> None:
    """Write one clip. `audio=None` writes no audio track at all; with `wav_path` the audio goes to a
    separate wav instead of the mp4's track."""
    num_frames = round(seconds * fps)
    video = torch.from_numpy(moving_pattern(num_frames, size[0], size[1], seed))
    track = None
    if audio is not None:
        samples = synth_audio(seconds, sample_rate, audio, seed)
        if wav_path is not None:
            write_wav(Path(wav_path), samples, sample_rate)
        else:
            track = torch.from_numpy(samples)
    write_mp4(path, video, fps=fps, audio=track, sample_rate=sample_rate)


def speak(text: str, voice: str = "en") -> tuple[np.ndarray, int]:
    """Real speech from espeak-ng (`apt-get install espeak-ng`): ([1, S] float32, sample rate)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True, capture_output=True)
        with wave.open(str(out)) as f:
            rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0)[None], rate


def make_speech_clip(
    path: str | Path,
    text: str,
    voice: str = "en",
    seconds: float = 2.0,
    audio_seconds: float | None = None,
    audio_start: float = 0.0,
    size: tuple[int, int] = (64, 112),
    fps: float = 25.0,
    wav_path: str | Path | None = None,
    seed: int = 0,
) -> float:
    """An mp4 of `seconds` of moving pattern with `text` spoken by espeak-ng as its AAC track
    (or, with `wav_path`, as a separate 16-bit wav). The speech is cut or padded with silence to
    `audio_seconds` (default: as long as it is) and, in the mp4, starts `audio_start` s after the
    first video frame (the track's own start offset, as a late track of real footage has).
    Returns the audio length in seconds."""
    speech, rate = speak(text, voice)
    if audio_seconds is not None:
        n = round(audio_seconds * rate)
        speech = np.pad(speech[:, :n], ((0, 0), (0, max(0, n - speech.shape[1]))))
    frames = moving_pattern(round(seconds * fps), size[0], size[1], seed)
    if wav_path is not None:
        write_wav(Path(wav_path), speech, rate)
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = size[1], size[0], "yuv420p"
        video.options = {"crf": "23", "preset": "veryfast"}
        audio = None
        if wav_path is None:
            audio = container.add_stream("aac", rate=rate)
            audio.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            offset = round(audio_start * rate)
            for start in range(0, speech.shape[1], 1024):
                chunk = np.ascontiguousarray(speech[:, start : start + 1024])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, offset + start
                container.mux(audio.encode(frame))
            container.mux(audio.encode())
    return speech.shape[1] / rate


def make_demo_dataset(
    out_dir: str | Path,
    num_clips: int = 8,
    seconds: float | tuple[float, float] = 2.0,
    size: tuple[int, int] = (64, 128),
    fps: float = 25.0,
    audio: str = "tone",
    separate_wav: bool = False,
    reference_image: bool = False,
    seed: int = 0,
) -> list[Path]:
    """A folder of `clip_NNNN.mp4` + `clip_NNNN.json` (caption, language) [+ `clip_NNNN.wav`]
    [+ `clip_NNNN.jpg`, the clip's first frame, with `reference_image`].

    `seconds` may be a (min, max) range: durations then vary per clip (seeded), which exercises
    the duration buckets. Returns the mp4 paths; the folder is what `make_shards.py` reads.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_clips):
        secs = float(rng.uniform(*seconds)) if isinstance(seconds, tuple | list) else float(seconds)
        secs = round(secs * fps) / fps
        stem = out / f"clip_{i:04d}"
        kind = audio if i % 2 == 0 else ("noise" if audio == "tone" else "tone")
        wav = stem.with_suffix(".wav") if separate_wav else None
        make_clip(stem.with_suffix(".mp4"), secs, size, fps, kind, wav_path=wav, seed=seed * 100003 + i)
        caption = {
            "caption": f"A {kind} clip number {i}: a white square bouncing over a gradient.",
            "language": LANGUAGES[i % len(LANGUAGES)],
        }
        stem.with_suffix(".json").write_text(json.dumps(caption))
        if reference_image:
            write_jpg(stem.with_suffix(".jpg"), moving_pattern(1, size[0], size[1], seed * 100003 + i)[0])
        paths.append(stem.with_suffix(".mp4"))
    return paths


def make_latent_dataset(
    out_dir: str | Path,
    num_samples: int = 16,
    per_shard: int = 4,
    latent_shapes: tuple[tuple[int, int, int], ...] = ((7, 4, 8),),
    text_dim: int = 3584,
    text_lengths: tuple[int, int] = (3, 12),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    sr_factor: int | None = None,
) -> list[Path]:
    """Latent shards of random tensors in the contract's shapes (no codec needed): sample i gets
    `latent_shapes[i % len]` as (T, H, W), N = 4(T-1)+1 audio steps, a seeded text length;
    video/audio latents stored in `dtype` (encode_shards.py stores bfloat16), text in bfloat16.
    With `sr_factor` f, SR pairs as `encode_shards.py --sr` writes them: (T, H, W) is the SR grid
    and `lr_video_latent` [48, T, H/f, W/f] the low-resolution latent of the same frames.

    For the latent-mode tests, benchmark and demo; returns the shard paths.
    """
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for number, first in enumerate(range(0, num_samples, per_shard)):
        samples = []
        for i in range(first, min(first + per_shard, num_samples)):
            t, h, w = latent_shapes[i % len(latent_shapes)]
            length = int(torch.randint(text_lengths[0], text_lengths[1] + 1, (1,), generator=gen))
            tensors = {
                "video_latent": torch.randn(48, t, h, w, generator=gen).to(dtype),
                "audio_latent": torch.randn(4 * (t - 1) + 1, 64, generator=gen).to(dtype),
                "text_emb": torch.randn(length, text_dim, generator=gen).to(torch.bfloat16),
            }
            if sr_factor:
                low = torch.randn(48, t, h // sr_factor, w // sr_factor, generator=gen)
                tensors["lr_video_latent"] = low.to(dtype)
            meta = {
                "caption": f"latent sample {i}",
                "language": LANGUAGES[i % len(LANGUAGES)],
                "duration": 4 * (t - 1) / 25,
                "width": 16 * w,
                "height": 16 * h,
            }
            samples.append(latent_sample(f"{number:06d}{i - first:04d}", meta, tensors))
        paths.append(write_shard(out_dir, number, "latent", samples))
    # the negative prompt's embedding, as encode_shards.py writes it beside latent shards
    length = int(torch.randint(text_lengths[0], text_lengths[1] + 1, (1,), generator=gen))
    save_negative(out_dir, torch.randn(length, text_dim, generator=gen).to(torch.bfloat16))
    return paths


# the class toy's prompt words: class c is COLOURS[c % 8] with a shape and a sound chosen so that
# the first 512 prompts differ (c's base-8 digits d0, d1, d2 give d0, d0 + d1, d0 + d1 + d2 mod 8)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "diamond")
SOUNDS = ("hums softly", "beeps twice", "whistles", "drums loudly", "rings", "buzzes", "chimes", "clicks")


def class_prompts(k: int) -> list[str]:
    """K distinct plain-ASCII prompts, one per class of `make_class_latent_dataset`: "A red circle
    hums softly", "A blue square beeps twice", ... (classes from 512 on add their number)."""
    prompts = []
    for c in range(k):
        d0, d1, d2 = c % 8, c // 8 % 8, c // 64 % 8
        text = f"A {COLOURS[d0]} {SHAPES[(d0 + d1) % 8]} {SOUNDS[(d0 + d1 + d2) % 8]}"
        prompts.append(text if c < 512 else f"{text}, number {c}")
    return prompts


def class_sample(prototypes: dict[str, torch.Tensor], c: int, spread: float, gen: torch.Generator):
    """One sample of class c of the toy: {"video": ..., "audio": ...}, each prototype + `spread` noise."""
    return {m: p[c] + spread * torch.randn(p[c].shape, generator=gen) for m, p in prototypes.items()}


def make_class_latent_dataset(
    out_dir: str | Path,
    prompts: list[str],
    text_encoder,
    samples_per_class: int = 16,
    per_shard: int = 8,
    latent_shape: tuple[int, int, int] = (3, 2, 4),
    spread: float = 0.1,
    seed: int = 0,
    pair_audio: bool = True,
) -> dict[str, torch.Tensor]:
    """A learnable toy in latent shards: class c is named by `prompts[c]` (its embedding from
    `text_encoder`, so `infer.py` and the pipeline can ask for it by that prompt) and its samples are
    the class's video and audio prototypes (standard normal, drawn once) plus `spread` Gaussian
    noise (`class_sample`): a model that learned the data answers each prompt with its own class's
    pair. Classes alternate sample by sample, so every shard mixes them; the negative prompt is
    written beside the shards. Scores of generated samples: `magitrain.data.toy_scores`.
    `pair_audio=False` (a negative control of audio-driven training): each sample's audio is of a
    class drawn at random, so it says nothing of the video.

    Returns the prototypes: {"video": [K, 48, T, H, W], "audio": [K, N, 64]}, N = 4(T-1)+1.
    """
    t, h, w = latent_shape
    gen = torch.Generator().manual_seed(seed)
    protos = {
        "video": torch.randn(len(prompts), 48, t, h, w, generator=gen),
        "audio": torch.randn(len(prompts), 4 * (t - 1) + 1, 64, generator=gen),
    }
    emb, lengths = text_encoder.encode(list(prompts))
    total = samples_per_class * len(prompts)
    for number, first in enumerate(range(0, total, per_shard)):
        samples = []
        for i in range(first, min(first + per_shard, total)):
            c = i % len(prompts)
            sample = class_sample(protos, c, spread, gen)
            if not pair_audio:  # (drawn after the pair: a paired toy's numbers stay as they were)
                other = int(torch.randint(len(prompts), (), generator=gen))
                sample["audio"] = class_sample({"audio": protos["audio"]}, other, spread, gen)["audio"]
            tensors = {f"{m}_latent": v for m, v in sample.items()}
            tensors["text_emb"] = emb[c, : int(lengths[c])].to(torch.bfloat16)
            meta = {"caption": prompts[c], "duration": 4 * (t - 1) / 25, "width": 16 * w, "height": 16 * h}
            samples.append(latent_sample(f"{number:06d}{i - first:04d}", meta, tensors))
        write_shard(out_dir, number, "latent", samples)
    write_negative(out_dir, text_encoder)
    return protos


def voice_sample(voices: torch.Tensor, k: int, tokens: int, content: float, gen: torch.Generator):
    """Audio latents [tokens, 64] of speaker k of the voice toy: its voice (a per-channel pattern,
    `voices[k]`, the same at every token) plus `content` Gaussian noise (what is said)."""
    return voices[k] + content * torch.randn(tokens, voices.shape[1], generator=gen)


def make_voice_latent_dataset(
    out_dir: str | Path,
    prompt: str,
    text_encoder,
    speakers: int = 4,
    clips_per_speaker: int = 16,
    per_shard: int = 8,
    latent_shape: tuple[int, int, int] = (12, 2, 4),
    content: float = 0.5,
    seed: int = 0,
    pair_reference: bool = True,
    bucket_tokens: int = 9,
) -> torch.Tensor:
    """The voice toy in latent shards: every clip has the one `prompt`, a video of one shared
    prototype plus 0.1 noise, and the audio of one of `speakers` speakers (`voice_sample`), with its
    `speaker` id in KEY.json. Clips are `latent_shape` (T latent frames: longer than a training
    bucket, so that `data.voice_reference` finds the clip's own voice past the cut). Only a model
    that listens to the reference can say which voice a clip has. `pair_reference=False` (a negative
    control): past the first `bucket_tokens` audio latents a clip speaks in another speaker's voice,
    so its own-clip references name the wrong voice. Returns the voices [K, 64]."""
    t, h, w = latent_shape
    gen = torch.Generator().manual_seed(seed)
    voices = torch.randn(speakers, 64, generator=gen)
    video = torch.randn(48, t, h, w, generator=gen)
    emb, lengths = text_encoder.encode([prompt])
    total = speakers * clips_per_speaker
    for number, first in enumerate(range(0, total, per_shard)):
        samples = []
        for i in range(first, min(first + per_shard, total)):
            k = i % speakers
            audio = voice_sample(voices, k, 4 * (t - 1) + 1, content, gen)
            if not pair_reference:  # (drawn after the pair: a paired toy's numbers stay as they were)
                other = (k + int(torch.randint(1, speakers, (), generator=gen))) % speakers
                audio[bucket_tokens:] = voice_sample(voices, other, len(audio) - bucket_tokens, content, gen)
            tensors = {
                "video_latent": video + 0.1 * torch.randn(video.shape, generator=gen),
                "audio_latent": audio,
                "text_emb": emb[0, : int(lengths[0])].to(torch.bfloat16),
            }
            meta = {"caption": prompt, "speaker": f"speaker{k}", "duration": 4 * (t - 1) / 25,
                    "width": 16 * w, "height": 16 * h}  # fmt: skip
            samples.append(latent_sample(f"{number:06d}{i - first:04d}", meta, tensors))
        write_shard(out_dir, number, "latent", samples)
    write_negative(out_dir, text_encoder)
    return voices


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write clip_NNNN.{mp4,json[,wav]} into")
    parser.add_argument("--num-clips", type=int, default=8)
    parser.add_argument(
        "--seconds",
        type=float,
        nargs="+",
        default=[2.0],
        help="one duration, or MIN MAX for seeded random durations",
    )
    parser.add_argument("--size", default="64x128", help="HEIGHTxWIDTH in pixels (even numbers)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--audio", choices=["tone", "noise"], default="tone")
    parser.add_argument("--separate-wav", action="store_true", help="audio in KEY.wav, not in the mp4")
    parser.add_argument("--reference-image", action="store_true", help="also write KEY.jpg (frame 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    seconds = args.seconds[0] if len(args.seconds) == 1 else tuple(args.seconds[:2])
    paths = make_demo_dataset(
        args.out_dir,
        args.num_clips,
        seconds,
        (height, width),
        args.fps,
        args.audio,
        args.separate_wav,
        args.reference_image,
        args.seed,
    )
    print(f"wrote {len(paths)} clips to {args.out_dir}")


if __name__ == "__main__":
    main()
