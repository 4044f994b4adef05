"""The MagiHuman generation pipeline: prompt (+ image) -> latents -> an mp4 with sound.

Stages, each timed with device synchronisation (Table 2 columns in `timing.py`):
text (+ negative prompt for CFG) -> image latent (image-to-video) -> the given audio's or video's
latent (audio-driven video, video-to-audio: kept clean by the samplers) -> base (8-step distilled,
or 32-step UniPC with CFG) -> SR (optional: upsampled latent refined by the SR model) -> decode
(the codecs' video decoder, Wan2.2 or Turbo-VAED, + audio VAE). `offload` chooses which weights
stay on the device between their stages (`residency.py`). `Generation.save` muxes the mp4
(H.264 + AAC, 25 fps) and writes the timings as JSON next to it. `infer.py`, the validation
callback and the benchmark all use it.
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from magitrain.codecs.media import (
    UPSAMPLE_MODES,
    reference_image,
    to_pixels,
    upsample_frames,
    video_to_uint8,
    write_mp4,
)
from magitrain.flow import (
    Guidance,
    initial_latents,
    sample_base,
    sample_distilled,
    sample_super_resolution,
    sr_guidance_scales,
    voice_guided,
)
from magitrain.model import MagiHumanDiT

from .distributed import Ranks
from .given import (
    check_given,
    clip_frames,
    output_track,
    read_audio_file,
    read_video_file,
    read_voice_file,
)
from .residency import StageResidency
from .shapes import FPS, ClipShape, parse_output_size
from .steps import build_steps
from .timing import StageTimer, format_table, write_json

SAMPLERS = ("distilled", "base")
DEFAULT_SAMPLER = {8: "distilled", 32: "base"}  # the released distilled and base step counts
PRECISIONS = ("auto", "bf16", "fp32")
AUDIO_OUTS = ("given", "decoded")  # audio-driven video's track: the given samples, or the VAE round trip
DEFAULT_SECONDS = 5.0
OFFLOADS = ("none", "codecs", "stages")


@dataclass(frozen=True)
class Sampling:
    """The release's sampling settings, its values as defaults: base CFG (`guidance`: video 5 while
    t > 500, then 2; audio 5), SR steps, sampler (`unipc`, the release's; `distilled`: an SR student of
    recipe=sr_dmd2_*) and re-noise index (DDPM step 220: a = 0.8389), and SR
    CFG, off as in the shipped configs (`sr_cfg`: video scale 3.5, at most 2.0 on the first 13
    latent frames, the release's "CFG trick"; `sr_cfg_trick_value=None` turns the trick off)."""

    guidance: Guidance = Guidance()
    sr_steps: int = 5
    sr_noise_value: int = 220
    sr_cfg: bool = False
    sr_guidance: float = 3.5
    sr_cfg_trick_frames: int = 13
    sr_cfg_trick_value: float | None = 2.0
    sr_sampler: str = "unipc"


@dataclass
class TextInputs:
    """Prompt embeddings [B, L, C] with lengths [B]; the negative prompt's only for CFG."""

    emb: Tensor
    length: Tensor
    negative: Tensor | None = None
    negative_length: Tensor | None = None


@dataclass
class Generation:
    video: Tensor | None  # [3, F, H, W] float in [-1, 1], CPU: the decoder's output (None: not decoded)
    audio: Tensor | None  # [2, S] float, CPU
    sample_rate: int | None
    frames: Tensor | None  # [F, H', W', 3] uint8: what the mp4 holds (upsampled when output_size was given)
    timings: dict  # a Table 2 row (see timing.StageTimer.row)
    meta: dict = field(default_factory=dict)
    latents: tuple[Tensor, Tensor] | None = None  # the final ones: video [1, 48, T, h, w], audio [1, N, 64]

    def save(self, path: str | Path) -> Path:
        """Write `path` (mp4) and `path` with suffix .json (the timings, mux time included)."""
        if self.frames is None:
            raise ValueError("this clip was generated with decode=False: it has latents only (save_latents)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_mp4(path, self.frames, fps=FPS, audio=self.audio, sample_rate=self.sample_rate)
        self.timings["mux"] = time.perf_counter() - start
        write_json(path.with_suffix(".json"), [self.timings], **self.meta)
        return path

    def save_latents(self, path: str | Path) -> Path:
        """Write the final latents as safetensors: `video` [48, T, H, W] and `audio` [N, 64], float32
        (the SR stage's video latent when it ran), with the generation's settings as JSON metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        video, audio = (x[0].detach().to("cpu", torch.float32).contiguous() for x in self.latents)
        save_file({"video": video, "audio": audio}, path, metadata={"generation": json.dumps(self.meta)})
        return path

    def table(self) -> str:
        return format_table([self.timings])


class MagiHumanPipeline:
    """Generate clips with a base network and, optionally, an SR network.

    The networks are used as given (device, dtype and train/eval mode are the caller's); `precision`
    "bf16" runs them under bf16 autocast as released ("auto": bf16 on CUDA, float32 elsewhere).
    `offload`: "none" keeps everything on the device; "codecs" keeps the codecs in pinned host memory
    and gives each a device copy only for its stage; "stages" does so for the networks too (text
    encoder, base DiT, SR DiT, decoder), prefetching the next stage's weights while one runs.
    Noise comes from a generator on `generator_device` (CPU by default: a seed then gives the same
    noise on any machine).
    `group` (a torch.distributed group, see `distributed.py`) splits every DiT forward's sequence
    over its ranks; rank 0 encodes the conditioning (broadcast to the others), decodes and returns
    the clip, the other ranks return None from `generate` and `decode`.
    `compile`: "blocks" compiles each network's transformer layers, "step" each sampler's whole
    denoising step (`steps.py`; compilation is timed as warm-up, apart from the stages).
    `sampling`: guidance scales, SR steps, re-noise and SR CFG (`Sampling`: the release's values).
    """

    def __init__(
        self,
        model: MagiHumanDiT,
        codecs,
        sr_model: MagiHumanDiT | None = None,
        *,
        device: torch.device | str | None = None,
        precision: str = "auto",
        offload: str = "none",
        generator_device: str = "cpu",
        group=None,
        compile: str = "none",
        compile_backend: str = "inductor",
        sampling: Sampling | None = None,
    ):
        if offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
        self.model, self.codecs, self.sr_model = model, codecs, sr_model
        self.sampling = sampling or Sampling()
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.bf16 = uses_bf16(precision, self.device)
        self.generator_device = generator_device
        self.residency = None
        self._plan: list[str] = []  # the stages still to come in this generation (for prefetching)
        self.ranks = Ranks(group)
        self.ranks.split_networks(model, sr_model)
        self.compile = compile
        self.steps = build_steps(model, sr_model, compile, compile_backend)
        writer = self.ranks.writer  # only rank 0 runs the codecs
        if offload == "none":
            if writer:
                codecs.to(self.device)
            return
        codecs.text.offload, codecs.text.device = False, self.device  # its weights move with the stage
        stages = {
            "text": [codecs.text.model],
            "image": [codecs.video],
            "given": [codecs.video, codecs.audio],
            "decode": [codecs.video_decoder, codecs.audio],
        }
        if not writer:
            stages = {}
        if offload == "stages":
            stages.update(base=[model], sr=[sr_model] if sr_model is not None else [])
        self.residency = StageResidency(self.device, stages)

    @property
    def offload(self) -> str:
        if self.residency is None:
            return "none"
        return "stages" if "base" in self.residency.stages else "codecs"

    # ----- stages ---------------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str):
        """Offloading: the stage's weights are on the device inside, the next planned stage's arrive."""
        if self._plan and self._plan[0] == name:
            self._plan.pop(0)
        if self.residency is None:
            yield
            return
        with self.residency.stage(name, prefetch=self._plan[0] if self._plan else None):
            yield

    def _autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def encode_prompt(self, prompt: str, guidance: bool, negative_prompt: str | None = None) -> TextInputs:
        """Prompt (and, for CFG, negative prompt) embeddings; under CP rank 0's, on every rank."""
        encoded = [None] * 4
        if self.ranks.writer:
            text = self.codecs.text
            with self._stage("text"):
                encoded[:2] = text.encode([prompt])
                if guidance:
                    neg = negative_prompt is not None
                    encoded[2:] = text.encode([negative_prompt]) if neg else text.encode_negative(1)
        return TextInputs(
            *(None if t is None else t.to(self.device) for t in self.ranks.broadcast(encoded, self.device))
        )

    def encode_image(self, image: str | Path | Image.Image | Tensor, clip: ClipShape) -> Tensor:
        """An image (file, PIL or uint8 [3, H, W] tensor) -> the frame-0 latent [1, 48, 1, h, w] at
        `clip`'s size, the image prepared as released (`reference_image`: EXIF, crop, Lanczos)."""
        if isinstance(image, (str, Path)) and not Path(image).is_file():
            raise FileNotFoundError(f"image={image}: no such file")
        if isinstance(image, Tensor):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        pixels = reference_image(image, (clip.height, clip.width))
        latent = None
        if self.ranks.writer:
            with self._stage("image"):
                latent = self.codecs.video.encode_image(pixels.unsqueeze(0).to(self.device)).to(self.device)
        return self.ranks.broadcast([latent], self.device)[0]

    def encode_given(
        self, audio: Tensor | None, frames: Tensor | None, clip: ClipShape
    ) -> tuple[Tensor | None, Tensor | None]:
        """The clean latents of the given media: (audio [1, N, 64] of a mono waveform [1, S] at the
        audio codec's rate, N = the clip's frames; video [1, 48, T, h, w] of uint8 frames [F, H, W, 3]
        at 25 fps, `clip_frames`). None where not given; under CP rank 0's, on every rank."""
        latents = [None, None]
        if self.ranks.writer:
            with self._stage("given"):
                if audio is not None:
                    codec = self.codecs.audio
                    latent = codec.encode(audio[None], codec.model_rate, num_frames=clip.frames)
                    latents[0] = latent.to(self.device)
                if frames is not None:
                    pixels = to_pixels(clip_frames(frames, clip).permute(3, 0, 1, 2))
                    latents[1] = self.codecs.video.encode(pixels[None].to(self.device)).to(self.device)
        return self.ranks.broadcast(latents, self.device)

    def encode_voice(self, wave: Tensor) -> Tensor:
        """The voice reference's clean latents [1, R, 64] (R = 25 per second) of a mono waveform [1, S]
        at the audio codec's rate, encoded as `audio=` is; under CP rank 0's, on every rank."""
        latent = None
        if self.ranks.writer:
            with self._stage("given"):
                codec = self.codecs.audio
                latent = codec.encode(wave[None], codec.model_rate).to(self.device)
        return self.ranks.broadcast([latent], self.device)[0]

    def sample(
        self,
        text: TextInputs,
        clip: ClipShape,
        timer: StageTimer,
        *,
        steps: int = 8,
        sampler: str = "distilled",
        seed: int = 0,
        sr_clip: ClipShape | None = None,
        image_latents: tuple[Tensor, Tensor | None] | None = None,
        clean_video: Tensor | None = None,
        clean_audio: Tensor | None = None,
        voice: Tensor | None = None,
        voice_scale: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Base stage, then the SR stage when `sr_clip` is given: (video latent, audio latent).
        A clean latent (audio-driven video: `clean_audio`; video-to-audio: `clean_video`) is held
        fixed by the samplers; the SR stage gets the base stage's audio, so the given one in a2v.
        `voice` [1, R, 64]: the base network sees this reference at every step, guided with
        `voice_scale` against no reference (`voice_guided`); its steps run eager (a compiled step
        holds the plain network). The SR stage sees none: it keeps the base stage's audio."""
        if clean_video is not None and sr_clip is not None:
            raise ValueError("a given video (clean_video) has nothing for an SR stage to refine")
        generator = torch.Generator(self.generator_device).manual_seed(seed)
        base_image, sr_image = image_latents or (None, None)
        text = trim_text(text)
        for step in self.steps.values():
            step.timer = timer
        network, steps_fns = self.model, self.steps
        if voice is not None:
            network, steps_fns = voice_guided(self.model, voice, voice_scale), {}
        with timer("base"), self._stage("base"), self._autocast():
            video, audio = initial_latents(
                clip.video_latent_shape(), clip.audio_latent_shape(), generator, self.device
            )
            if sampler == "distilled":
                video, audio = sample_distilled(
                    network, video, audio, text.emb, text.length,
                    generator=generator, steps=steps, image_latent=base_image, clean_video=clean_video,
                    clean_audio=clean_audio, step_fn=steps_fns.get("distilled"),
                )  # fmt: skip
            else:
                video, audio = sample_base(
                    network, video, audio, text.emb, text.length, text.negative, text.negative_length,
                    steps=steps, guidance=self.sampling.guidance, image_latent=base_image,
                    clean_video=clean_video, clean_audio=clean_audio, step_fn=steps_fns.get("base"),
                )  # fmt: skip
        if sr_clip is None:
            return video, audio
        if self.sr_model is None:
            raise ValueError("an SR stage was asked for but the pipeline has no SR model (sr_ckpt)")
        options = self.sampling
        scales = None
        if options.sr_cfg:
            scales = sr_guidance_scales(
                sr_clip.latent_frames,
                options.sr_guidance,
                options.sr_cfg_trick_frames,
                options.sr_cfg_trick_value,
            )
        with timer("sr"), self._stage("sr"), self._autocast():
            video = sample_super_resolution(
                functools.partial(self.sr_model, coords_style="v1"), video, audio, text.emb, text.length,
                size=sr_clip.latent_size, generator=generator, steps=options.sr_steps,
                noise_value=options.sr_noise_value, image_latent=sr_image, negative_text=text.negative,
                negative_text_len=text.negative_length, guidance_scale=scales,
                step_fn=self.steps.get("sr_cfg" if options.sr_cfg else "sr"), sampler=options.sr_sampler,
            )  # fmt: skip
        return video, audio

    def decode(self, video_latent: Tensor, audio_latent: Tensor, timer: StageTimer, video_decoder=None):
        """Latents -> (video [3, F, H, W] in [-1, 1], stereo audio [2, S], sample rate, uint8 frames
        [F, H, W, 3]), on the CPU.

        Decode times what the release's timer does: the video decode, the host copy and the uint8
        frames (`decode_video`; its on-device part alone is `decode_video_device`), then the audio
        decode and its resampling to 44.1 kHz (`decode_audio`). The video decoder is the codecs'
        `video_decoder` (Wan2.2 or Turbo-VAED); the benchmark passes another one (`codecs.video`)
        to time both on the same latents. Under CP only rank 0 decodes; the others return None."""
        if not self.ranks.writer:
            self._plan = []
            return None
        decoder = self.codecs.video_decoder if video_decoder is None else video_decoder
        with timer("decode"), self._stage("decode"):
            with timer("decode_video"):
                with timer("decode_video_device"):
                    video = decoder.decode(video_latent)[0]
                video = video.cpu()
                frames = video_to_uint8(video)
            with timer("decode_audio"):
                audio, rate = self.codecs.audio.decode(audio_latent)
                audio = audio[0].cpu()
        self._plan = []
        return video, audio, rate, frames

    # ----- all together -----------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        output_size: str | None = None,
        upsample_mode: str = "bilinear",
        decode: bool = True,
        audio_out: str = "given",
        **options,
    ) -> Generation | None:
        """One clip for `prompt`: `generate_latents(prompt, **options)`, then the decode stage
        (`decode=False`: none, the clip holds its latents only).
        `output_size` ('WxH') resizes the decoded frames with `upsample_mode` (bilinear | nearest |
        bicubic), as the release's `--output_width/--output_height/--upsample_mode`.
        Audio-driven video (`audio=`) carries the given audio (`audio_out="given"`: its samples at
        the output rate; "decoded": the audio VAE's round trip, as released); video-to-audio
        (`video=`) the given pictures.
        Under CP: rank 0's clip, whose timings hold every rank's peak memory; None on the others."""
        size = parse_output_size(output_size) if output_size is not None else None
        if upsample_mode not in UPSAMPLE_MODES:  # before the stages, not after them
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}")
        if audio_out not in AUDIO_OUTS:
            raise ValueError(f"audio_out must be one of {AUDIO_OUTS}, got {audio_out!r}")
        latents, timer, meta = self.generate_latents(prompt, plan_decode=decode, **options)
        decoded = self.decode(*latents, timer) if decode else (None,) * 4
        row = timer.row(meta["sr"] or meta["resolution"])
        if self.ranks.size > 1:
            row["peak_gib_ranks"] = self.ranks.gather(timer.peak_gib)
        if decoded is None or not self.ranks.writer:
            return None
        video, audio, rate, frames = decoded
        if not decode:
            return Generation(None, None, None, None, row, meta, latents=latents)
        if meta.get("audio") and audio_out == "given":  # read again at the output rate: one resampling
            audio = output_track(meta["audio"], meta["seconds"], rate, audio.shape[-1])
            meta.update(audio_out=audio_out)
        if meta.get("video"):
            clip = ClipShape.of(meta["seconds"], meta["resolution"])
            frames = clip_frames(read_video_file(meta["video"], meta["seconds"]), clip)
        if size is not None:  # after the timed stages, as released
            frames = upsample_frames(frames, size[::-1], upsample_mode)
            meta.update(output_size=output_size, upsample_mode=upsample_mode)
        return Generation(video, audio, rate, frames, row, meta, latents=latents)

    def generate_latents(
        self,
        prompt: str,
        *,
        seconds: float | None = None,
        resolution: str = "256p",
        sr: str | None = None,
        steps: int = 8,
        sampler: str | None = None,
        seed: int = 0,
        image: str | Path | Tensor | None = None,
        audio: str | Path | None = None,
        video: str | Path | None = None,
        negative_prompt: str | None = None,
        plan_decode: bool = True,
        voice: str | Path | None = None,
        voice_scale: float = 1.0,
    ) -> tuple[tuple[Tensor, Tensor], StageTimer, dict]:
        """Text, image, given media, base and SR stages: ((video latent, audio latent), their timer,
        the settings).

        `sr` ('540p', '1080p' or WxH) adds the SR stage, and the base stage takes its orientation
        (`ClipShape.stages`); `sampler` defaults to the one of `steps`. `audio` (a file: audio-driven
        video) or `video` (video-to-audio) is kept clean and sets the clip's length, which `seconds`
        trims (default without them: 5 s); the returned latent of that modality is its clean one.
        `plan_decode=False`: no decode stage follows (offloading prefetches nothing for it).
        `voice` (a file, 1 to 10 s; longer ones are clipped): the speaker whose voice the clip's
        speech takes, at `voice_scale` (`sample`).
        """
        sampler = sampler or DEFAULT_SAMPLER.get(steps)
        if sampler not in SAMPLERS:
            raise ValueError(f"steps={steps} has no default sampler: pass sampler= one of {SAMPLERS}")
        check_given(audio, video, image, sr, voice)
        wave, frames, seconds = self.read_given(audio, video, seconds)
        voice_wave = read_voice_file(voice, self.codecs.audio.model_rate) if voice is not None else None
        clip, sr_clip = ClipShape.stages(seconds, resolution, sr)
        given = wave is not None or frames is not None or voice is not None
        self._plan = [
            "text",
            *(["image"] if image is not None else []),
            *(["given"] if given else []),
            "base",
            *(["sr"] if sr else []),
            *(["decode"] if plan_decode else []),
        ]
        timer = StageTimer(self.device)
        with timer("text"):
            guided = sampler == "base" or bool(sr and self.sampling.sr_cfg)
            text = self.encode_prompt(prompt, guidance=guided, negative_prompt=negative_prompt)
        conditions = self._conditions(timer, clip, sr_clip, image, wave, frames)
        if voice_wave is not None:
            with timer("given"):
                conditions.update(voice=self.encode_voice(voice_wave), voice_scale=voice_scale)
        latents = self.sample(
            text, clip, timer, steps=steps, sampler=sampler, seed=seed, sr_clip=sr_clip, **conditions
        )
        meta = dict(prompt=prompt, seed=seed, seconds=seconds, steps=steps, sampler=sampler,
                    resolution=resolution, sr=sr, frames=clip.frames, device=str(self.device),
                    precision="bf16" if self.bf16 else "fp32", video_decoder=self.codecs.video_decoder_name,
                    offload=self.offload, cp=self.ranks.size, compile=self.compile)  # fmt: skip
        if sr:
            meta.update(sr_steps=self.sampling.sr_steps, sr_sampler=self.sampling.sr_sampler)
        given_files = (("audio", audio), ("video", video), ("voice", voice))
        meta.update({k: str(path) for k, path in given_files if path is not None})
        if voice is not None:
            meta.update(voice_scale=voice_scale)
        return latents, timer, meta

    def _conditions(self, timer: StageTimer, clip, sr_clip, image, wave, frames) -> dict:
        """`sample`'s conditioning latents, each stage timed: the image's (base and SR sizes) and the
        given media's clean ones."""
        conditions = {}
        if image is not None:
            with timer("image"):
                conditions["image_latents"] = (
                    self.encode_image(image, clip),
                    self.encode_image(image, sr_clip) if sr_clip else None,
                )
        if wave is not None or frames is not None:
            with timer("given"):
                conditions["clean_audio"], conditions["clean_video"] = self.encode_given(wave, frames, clip)
        return conditions

    def read_given(
        self, audio: str | Path | None, video: str | Path | None, seconds: float | None
    ) -> tuple[Tensor | None, Tensor | None, float]:
        """(mono waveform [1, S] at the audio codec's rate, frames [F, H, W, 3] at 25 fps, the clip's
        seconds) of the given file, cut to `seconds`; neither given: (None, None, `seconds` or 5)."""
        if audio is not None:
            rate = self.codecs.audio.model_rate
            wave = read_audio_file(audio, rate, seconds)
            return wave, None, wave.shape[-1] / rate
        if video is not None:
            frames = read_video_file(video, seconds)
            return None, frames, (frames.shape[0] - 1) / FPS
        return None, None, DEFAULT_SECONDS if seconds is None else seconds


def trim_text(text: TextInputs) -> TextInputs:
    """Prompt embeddings cut to their longest real length, lengths None where nothing is padded: what
    the network's forward does itself (so no number changes), done once per clip instead of in
    every forward, where it would cost a compiled step a graph break (a value read off a tensor)."""

    def trim(emb: Tensor | None, length: Tensor | None):
        if emb is None or length is None:
            return emb, length
        emb = emb[:, : int(length.max())]
        return emb, None if bool((length == emb.shape[1]).all()) else length

    return TextInputs(*trim(text.emb, text.length), *trim(text.negative, text.negative_length))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` means bf16 autocast on `device` ("auto": on CUDA only)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")
