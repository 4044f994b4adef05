"""Encode/decode time of the real-size video and audio codecs (random weights) per 5 s clip.

    python scripts/bench_codecs.py                                   # CPU: 256p only, float32
    python scripts/bench_codecs.py --device cuda --dtype bfloat16 --resolutions 256p 540p 1080p

Random weights time exactly like trained ones (same architecture, same FLOPs). The video decode
here is the full Wan2.2 decoder; the report's decode column uses the lighter Turbo-VAED.
"""

import argparse
import json
import platform
import time

import torch

from magitrain.codecs import AudioCodec, VideoCodec
from magitrain.inference.benchmark import random_codecs

RESOLUTIONS = {"256p": (256, 448), "540p": (512, 896), "1080p": (1088, 1920)}


def timed(fn, *args, device: torch.device):
    """(fn(*args), seconds), with the GPU drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def bench_audio(audio: AudioCodec, seconds: float, device: torch.device, warmup: bool) -> dict:
    wave = 0.1 * torch.randn(1, 2, round(seconds * 44100), device=device)
    if warmup:
        audio.decode(audio.encode(wave, 44100))
    latents, enc = timed(audio.encode, wave, 44100, device=device)
    _, dec = timed(audio.decode, latents, device=device)
    return {"codec": "audio", "input": "44.1 kHz stereo", "latents": list(latents.shape),
            "encode_s": enc, "decode_s": dec}  # fmt: skip


def bench_video(video: VideoCodec, name: str, frames: int, device: torch.device, warmup: bool) -> dict:
    height, width = RESOLUTIONS[name]
    pixels = torch.rand(1, 3, frames, height, width, device=device) * 2 - 1
    if warmup:
        video.decode(video.encode(pixels[:, :, :5]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latents, enc = timed(video.encode, pixels, device=device)
    print(f"# video {name} encode: {enc:.2f} s", flush=True)  # decode can take much longer on a CPU
    _, dec = timed(video.decode, latents, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"codec": "video", "input": f"{name} {width}x{height}", "latents": list(latents.shape),
            "encode_s": enc, "decode_s": dec, "peak_gib": peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--resolutions", nargs="+", default=["256p"], choices=list(RESOLUTIONS))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--decode-tile", type=int, default=None, help="spatial decode tile in pixels")
    parser.add_argument("--warmup", action="store_true", help="one untimed run first (GPU kernels)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # The video VAE takes 4k+1 frames: a 5 s clip's 126 frames give 32 latent frames, as in the release
    # (its VAE drops the 126th frame); the audio codec gets the whole 5 s (126 latent frames).
    frames = 4 * (round(args.seconds * 25) // 4) + 1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        codecs = random_codecs(dtype, args.decode_tile).to(device)  # video VAE in dtype, audio VAE float32
        video, audio = codecs.video, codecs.audio
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {args.seconds:g} s clip ({frames} frames), {args.dtype}, {machine}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)  # fmt: skip
    show(bench_audio(audio, args.seconds, device, args.warmup))
    for name in args.resolutions:
        show(bench_video(video, name, frames, device, args.warmup))


def show(row: dict) -> None:
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
