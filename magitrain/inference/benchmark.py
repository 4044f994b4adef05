"""Table 2 benchmark: random weights at any preset (nothing downloaded), rows per output size.

Every output runs the 8-step distilled base stage at the base resolution (256p), then the SR stage
to the output size (none, 540p or 1080p; `a2v`: none, the base stage audio-driven by a given sound
of the clip's length, whose encoding is timed as the `given` stage), then decodes video and audio
from those latents with each video decoder the codecs hold (Turbo-VAED and the full Wan2.2 VAE),
side by side: one row per (output, decoder), the base and SR figures shared. An output `SIZE:N`
(e.g. `1080p:2`) runs its SR stage as a distilled SR student's N steps (recipe=sr_dmd2_*), beside
the released 5 UniPC steps of `SIZE`. The timed runs follow
warm-up runs (one by default) per output (compilation, kernel autotuning, allocator growth); with
`compile=step` the compilation of each step is timed apart, as `warmup`. Rows carry the peak device
memory of each stage (CUDA), and under context parallelism (`group`) each rank's (`peak_gib_ranks`,
base and SR).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck

from magitrain.codecs.audio import AudioCodec
from magitrain.codecs.container import Codecs, check_video_decoder
from magitrain.codecs.text import TextEncoder
from magitrain.codecs.tiny import tiny_audio_vae, tiny_text_model, tiny_tokenizer, tiny_video_vae
from magitrain.codecs.turbo_vaed import TurboVAED, TurboVideoDecoder
from magitrain.codecs.video import VideoCodec
from magitrain.model import get_config
from magitrain.model.config import sr1080_local_layers

from .networks import random_network, sharing_weights
from .pipeline import MagiHumanPipeline, Sampling, TextInputs, uses_bf16
from .shapes import FPS, ClipShape
from .timing import StageTimer

# Real codec sizes: the tiny codecs are the same classes with the widths shrunk (see codecs/tiny.py).
WAN22_WIDTHS = dict(base_dim=160, decoder_base_dim=256, num_res_blocks=2)
OOBLECK_WIDTHS = dict(channel_multiples=[1, 2, 4, 8, 16], decoder_channels=128)
SR_PRESETS = {"540p": "magihuman_15b_sr540", "1080p": "magihuman_15b_sr1080"}
A2V = "a2v"  # the row of the audio-driven base stage


def sr_row(output: str) -> tuple[str, Sampling]:
    """(SR size, sampling) of a row: `SIZE` the released 5 UniPC steps, `SIZE:N` a distilled SR
    student's N steps."""
    size, _, steps = output.partition(":")
    if not steps:
        return size, Sampling()
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"benchmark row {output!r}: SIZE:N needs N >= 1 distilled SR steps")
    return size, Sampling(sr_steps=int(steps), sr_sampler="distilled")


def random_codecs(dtype: torch.dtype, decode_tile: int | None = None, video_decoder: str = "turbo") -> Codecs:
    """Full-size Wan2.2 video VAE (in `dtype`, spatial decode tiles of `decode_tile` px if set),
    Turbo-VAED of the released config (in `dtype`; `video_decoder=wan` leaves it out) and Stable
    Audio Open VAE with random weights, for decode timings. The text encoder is the tiny one: the
    benchmark feeds random embeddings."""
    check_video_decoder(video_decoder)
    video = AutoencoderKLWan.from_config({**tiny_video_vae().config, **WAN22_WIDTHS}).to(dtype)
    audio = AutoencoderOobleck.from_config({**tiny_audio_vae().config, **OOBLECK_WIDTHS})
    turbo = TurboVideoDecoder(TurboVAED().to(dtype)) if video_decoder == "turbo" else None
    tokenizer = tiny_tokenizer()
    return Codecs(
        VideoCodec(video, decode_tile),
        AudioCodec(audio),
        TextEncoder(tiny_text_model(len(tokenizer)), tokenizer),
        video_decoder=turbo,
    )


def video_decoders(codecs: Codecs, wan_beside: bool = True) -> dict:
    """The decoders to time: the selected one first, then (`wan_beside`) the full Wan2.2 VAE if that
    is another."""
    decoders = {codecs.video_decoder_name: codecs.video_decoder}
    if wan_beside:
        decoders.setdefault("wan", codecs.video)
    return decoders


def sr_config(preset: str, output: str):
    """The SR network of an output row: the base preset's layout with the SR text coordinates, and
    the 1080p model's local attention pattern for 1080p (at the preset's own layer count)."""
    if preset == "magihuman_15b":
        return get_config(SR_PRESETS[output])
    config = get_config(preset, coords_style="v1")
    if output == "1080p":
        config = config.replace(local_attn_layers=sr1080_local_layers(config.num_layers), frame_window=11)
    return config


def run_benchmark(
    preset: str = "magihuman_15b",
    rows: tuple[str, ...] = ("none", "540p", "1080p"),
    *,
    seconds: float = 5.0,
    resolution: str = "256p",
    codecs: Codecs,
    device: torch.device | str,
    precision: str = "auto",
    compile: str = "none",
    compile_backend: str = "inductor",
    text_tokens: int = 300,
    repeats: int = 2,
    warmup: int = 1,
    group=None,
    wan_beside: bool = True,
) -> list[dict] | None:
    """Table 2 rows, one per (output, video decoder): seconds per stage, the mean of `repeats`
    timed runs after `warmup` runs; `peak_gib` per stage on CUDA (the maximum over the runs).
    `compile`: none | blocks | step (see `steps.py`). `wan_beside=False` times the selected video
    decoder only (a 1080p Wan2.2 decode takes minutes). Under CP only rank 0 returns the rows."""
    device = torch.device(device)
    dtype = torch.bfloat16 if uses_bf16(precision, device) else torch.float32
    model = random_network(get_config(preset), device, dtype)
    clip = ClipShape.of(seconds, resolution)
    generator = torch.Generator("cpu").manual_seed(0)
    emb = torch.randn(1, text_tokens, model.config.text_in_channels, generator=generator).to(device)
    text = TextInputs(emb, torch.tensor([text_tokens], device=device))
    decoders = video_decoders(codecs, wan_beside)
    if compile != "none" and "turbo" in decoders:  # as the release, which compiles the per-window decoder
        decoders["turbo"].model.decoder.compile()
    results = []
    for output in rows:
        size, sampling = sr_row(output)
        sr_clip = None if output in ("none", A2V) else clip.with_resolution(size)
        sr_model = sharing_weights(model, sr_config(preset, size)) if sr_clip else None
        pipe = MagiHumanPipeline(
            model, codecs, sr_model, device=device, precision=precision, generator_device=str(device),
            group=group, compile=compile, compile_backend=compile_backend, sampling=sampling,
        )  # fmt: skip
        timings = {name: [] for name in decoders}
        for _ in range(warmup + repeats):
            sampled = StageTimer(device)
            given = _given_sound(pipe, clip, sampled) if output == A2V else {}
            latents = pipe.sample(text, clip, sampled, sr_clip=sr_clip, **given)
            rank_peaks = pipe.ranks.gather(sampled.peak_gib) if pipe.ranks.size > 1 else None
            if not pipe.ranks.writer:
                continue
            for name, decoder in decoders.items():
                timer = StageTimer(device)
                timer.seconds, timer.peak_gib = dict(sampled.seconds), dict(sampled.peak_gib)
                timer.warmup_seconds = dict(sampled.warmup_seconds)
                pipe.decode(*latents, timer, video_decoder=decoder)
                row = timer.row(f"{resolution} {A2V}" if given else resolution if sr_clip is None else output)
                if sr_clip is not None:
                    row.update(sr_steps=sampling.sr_steps, sr_sampler=sampling.sr_sampler)
                if rank_peaks is not None:
                    row.update(cp=pipe.ranks.size, peak_gib_ranks=rank_peaks)
                timings[name].append({**row, "decoder": name})
        results += [_mean(runs[warmup:], runs[:warmup]) for runs in timings.values()]
    return results if pipe.ranks.writer else None


def _given_sound(pipe: MagiHumanPipeline, clip: ClipShape, timer: StageTimer) -> dict:
    """The a2v row's clean audio latent: a seeded noise waveform of the clip's length encoded by the
    audio codec, timed as the `given` stage (as `infer.py audio=` encodes its file)."""
    rate = pipe.codecs.audio.model_rate
    wave = 0.1 * torch.randn(
        1, round((clip.frames - 1) / FPS * rate), generator=torch.Generator().manual_seed(0)
    )
    with timer("given"):
        clean_audio, _ = pipe.encode_given(wave, None, clip)
    return {"clean_audio": clean_audio}


def _mean(rows: list[dict], warm: list[dict]) -> dict:
    """Seconds averaged over the runs; peak memory is the maximum; `warmup` seconds are the warm-up
    runs' (where the compiled steps compile), summed."""
    out = dict(rows[0])
    warmups = [r["warmup"] for r in warm + rows if "warmup" in r]
    if warmups:
        out["warmup"] = {k: sum(w.get(k, 0.0) for w in warmups) for k in {k for w in warmups for k in w}}
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = sum(r[key] for r in rows) / len(rows)
    if "peak_gib" in out:
        out["peak_gib"] = {stage: max(r["peak_gib"][stage] for r in rows) for stage in out["peak_gib"]}
    return out
