"""A LoRA training step against a full fine-tuning step, side by side: seconds per step, the bytes
of the frozen weights and of the trained state (weights + grads + AdamW + EMA), CUDA peak memory.

Examples:
  python scripts/bench_lora.py --preset golden_tiny --shape 64x64x1s --rank 16
  # the 15B model at 256p 5 s on one GPU (random bf16 / fp8 base, rank 64, checkpointing):
  python scripts/bench_lora.py --preset magihuman_15b --shape 448x256x5s --rank 64 --device cuda \
      --modes lora_bf16 lora_fp8 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from magitrain.inference import ClipShape
from magitrain.lora import LoraConfig, add_adapter, build_frozen_base
from magitrain.lora.adapters import set_active
from magitrain.model import MagiHumanDiT, get_config


def parse_shape(shape: str) -> ClipShape:
    width, height, seconds = shape.lower().rstrip("s").split("x")
    return ClipShape.of(float(seconds), f"{width}x{height}")


def build(mode: str, config, rank: int, device: str) -> torch.nn.Module:
    if mode == "full":
        with torch.device(device):
            return MagiHumanDiT(config)
    network = build_frozen_base(config, None, mode.removeprefix("lora_"), device)
    for name in ("default", "ema"):
        add_adapter(network, LoraConfig(rank=rank), name)
    set_active(network, "default")
    return network


def nbytes(tensors) -> int:
    total = 0
    for t in tensors:
        inner = getattr(t, "qdata", None)  # torchao float8: data + per-row scales
        total += inner.nbytes + t.scale.nbytes if inner is not None else t.numel() * t.element_size()
    return total


def run(mode: str, args, config, clip: ClipShape) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    network = build(mode, config, args.rank, args.device)
    trained = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device).manual_seed(0)
    T, H, W = clip.latent_size
    video = torch.randn(1, 48, T, H, W, device=device, generator=g)
    audio = torch.randn(1, clip.audio_tokens, 64, device=device, generator=g)
    text = torch.randn(1, args.text_tokens, config.text_in_channels, device=device, generator=g)
    autocast = mode in ("lora_bf16", "lora_fp8") or args.bf16  # as the LoRA recipe runs them
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            v, a = network(video, audio, text)
            loss = v.float().square().mean() + a.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # grads stay allocated, as between steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    frozen = [p for p in network.parameters() if not p.requires_grad]
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    ema = [p for k, p in network.named_parameters() if ".ema." in k]
    row = {
        "mode": mode,
        "trained_params_M": sum(p.numel() for p in trained) / 1e6,
        "frozen_GiB": nbytes(frozen) / 2**30,
        "trained_state_GiB": (2 * nbytes(trained) + nbytes(states) + nbytes(ema)) / 2**30,
        "s_per_step": statistics.median(times[args.warmup :]),
    }
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="golden_tiny")
    p.add_argument("--shape", default="64x64x1s", help="WIDTHxHEIGHTxSECONDSs")
    p.add_argument("--text-tokens", type=int, default=100)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["full", "lora_fp32", "lora_bf16", "lora_fp8"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="full fine-tuning under bf16 autocast too")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = get_config(args.preset, activation_checkpointing=args.checkpointing)
    clip = parse_shape(args.shape)
    for mode in args.modes:
        print(
            json.dumps(
                {
                    k: round(v, 4) if isinstance(v, float) else v
                    for k, v in run(mode, args, config, clip).items()
                }
            )
        )


if __name__ == "__main__":
    main()
