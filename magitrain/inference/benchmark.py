"""Table 2 benchmark: random weights at any preset (nothing downloaded), one row per output size.

Every row runs the 8-step distilled base stage at the base resolution (256p), then the SR stage
to the row's output size (none, 540p or 1080p), then decodes video and audio. The timed runs
follow warm-up runs (one by default) per row (compilation, kernel autotuning, allocator growth).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck

from magitrain.codecs.audio import AudioCodec
from magitrain.codecs.container import Codecs
from magitrain.codecs.text import TextEncoder
from magitrain.codecs.tiny import tiny_audio_vae, tiny_text_model, tiny_tokenizer, tiny_video_vae
from magitrain.codecs.video import VideoCodec
from magitrain.model import get_config

from .networks import compile_blocks, random_network, sharing_weights
from .pipeline import MagiHumanPipeline, TextInputs, uses_bf16
from .shapes import ClipShape
from .timing import StageTimer

# Real codec sizes: the tiny codecs are the same classes with the widths shrunk (see codecs/tiny.py).
WAN22_WIDTHS = dict(base_dim=160, decoder_base_dim=256, num_res_blocks=2)
OOBLECK_WIDTHS = dict(channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128)
SR_PRESETS = {"540p": "magihuman_15b_sr540", "1080p": "magihuman_15b_sr1080"}


def random_codecs(dtype: torch.dtype, decode_tile: int | None = None) -> Codecs:
    """Full-size Wan2.2 video VAE (in `dtype`, spatial decode tiles of `decode_tile` px if set) and
    Stable Audio Open VAE with random weights, for decode timings. The text encoder is the tiny
    one: the benchmark feeds random embeddings."""
    video = AutoencoderKLWan.from_config({**tiny_video_vae().config, **WAN22_WIDTHS}).to(dtype)
    audio = AutoencoderOobleck.from_config({**tiny_audio_vae().config, **OOBLECK_WIDTHS})
    tokenizer = tiny_tokenizer()
    return Codecs(
        VideoCodec(video, decode_tile),
        AudioCodec(audio),
        TextEncoder(tiny_text_model(len(tokenizer)), tokenizer),
    )


def sr_config(preset: str, output: str):
    """The SR network of an output row: the base preset's layout, with the 1080p local attention
    for 1080p when the preset is the 15B one (tiny presets keep their own layout)."""
    if preset == "magihuman_15b":
        return get_config(SR_PRESETS[output])
    return get_config(preset, coords_style="v1")


def run_benchmark(
    preset: str = "magihuman_15b",
    rows: tuple[str, ...] = ("none", "540p", "1080p"),
    *,
    seconds: float = 5.0,
    resolution: str = "256p",
    codecs: Codecs,
    device: torch.device | str,
    precision: str = "auto",
    compile: bool = False,
    text_tokens: int = 100,
    repeats: int = 2,
    warmup: int = 1,
) -> list[dict]:
    """Table 2 rows: seconds per stage, the mean of `repeats` timed runs after `warmup` runs."""
    device = torch.device(device)
    dtype = torch.bfloat16 if uses_bf16(precision, device) else torch.float32
    model = random_network(get_config(preset), device, dtype)
    if compile:
        compile_blocks(model)
    clip = ClipShape.of(seconds, resolution)
    generator = torch.Generator("cpu").manual_seed(0)
    emb = torch.randn(1, text_tokens, model.config.text_in_channels, generator=generator).to(device)
    text = TextInputs(emb, torch.tensor([text_tokens], device=device))
    results = []
    for output in rows:
        sr_clip = None if output == "none" else clip.with_resolution(output)
        sr_model = sharing_weights(model, sr_config(preset, output)) if sr_clip else None
        if sr_model is not None and compile:
            compile_blocks(sr_model)
        pipe = MagiHumanPipeline(
            model, codecs, sr_model, device=device, precision=precision, generator_device=str(device)
        )
        timings = []
        for _ in range(warmup + repeats):
            timer = StageTimer(device)
            pipe.decode(*pipe.sample(text, clip, timer, sr_clip=sr_clip), timer)
            timings.append(timer.row(resolution if sr_clip is None else output))
        results.append(_mean(timings[warmup:]))
    return results


def _mean(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = sum(r[key] for r in rows) / len(rows)
    return out
