"""Forward and forward+backward throughput of MagiHumanDiT: tokens/s, TFLOP/s and MFU.

Examples:
  python scripts/bench_model.py --preset tiny --shape 64x64x1s
  # the 15B-wide slice on one H100: 2 sandwich + 2 shared layers, 256p 5 s, bf16
  python scripts/bench_model.py --preset magihuman_15b --layers 4 --sandwich 0,1 --gelu 0 \
      --shape 448x256x5s --dtype bf16 --compile --peak-tflops 989
  # TREAD side by side (training steps with and without routing, interleaved rounds): a 5-layer
  # slice routing layers 1..3 routes 3 of 5 layers, the released 24 of 40 (60 %)
  python scripts/bench_model.py --preset magihuman_15b --layers 5 --sandwich 0,1,4 --gelu 0 \
      --shape 448x256x5s --dtype bf16 --compile --tread 0.5 --tread-layers 1,3 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from magitrain.flow.tread import TreadConfig
from magitrain.inference import ClipShape
from magitrain.model import MagiHumanDiT, SequenceLayout, get_config
from magitrain.model.compile import compile_layers
from magitrain.model.flops import forward_flops


def parse_shape(shape: str) -> ClipShape:
    """'WxHxSs' (pixels, seconds) -> the clip as the released pipeline sizes it (inference.ClipShape)."""
    width, height, seconds = shape.lower().rstrip("s").split("x")
    return ClipShape.of(float(seconds), f"{width}x{height}")


def build(args) -> MagiHumanDiT:
    overrides = {}
    if args.hidden:  # a wider or narrower toy of the same shape ratios (CPU benchmarks)
        heads = args.hidden // args.head_dim
        overrides |= dict(hidden_size=args.hidden, head_dim=args.head_dim, num_heads_q=heads)
        overrides |= dict(num_heads_kv=max(1, heads // 4), swiglu_hidden=args.hidden * 8 // 3)
        overrides |= dict(gelu_hidden=4 * args.hidden, text_in_channels=args.hidden)
    if args.layers:
        overrides["num_layers"] = args.layers
        overrides["sandwich_layers"] = tuple(int(i) for i in args.sandwich.split(",") if i)
        overrides["gelu7_layers"] = tuple(int(i) for i in args.gelu.split(",") if i)
        overrides["local_attn_layers"] = ()
    config = get_config(args.preset, activation_checkpointing=args.checkpointing, **overrides)
    with torch.device(args.device):
        model = MagiHumanDiT(config)
    if args.compile:  # the training and inference compile path (bounded recompiles)
        compile_layers(model, backend=getattr(args, "compile_backend", "inductor"))
    return model


def time_steps(fn, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=0, help="override the layer count (a slice of the model)")
    p.add_argument("--sandwich", default="0,1", help="sandwich layers of the slice")
    p.add_argument("--gelu", default="0", help="gelu7 layers of the slice")
    p.add_argument("--shape", default="448x256x5s", help="video WxHxSECONDSs at 25 fps")
    p.add_argument("--text-len", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: dry runs)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 SXM bf16: 989)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=0, help="override the width (heads of --head-dim)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tread", type=float, default=0.0, help="also time training steps with this TREAD rate")
    p.add_argument("--tread-layers", default="", help="START,END of the routed layers (default: scaled span)")
    p.add_argument("--rounds", type=int, default=3, help="TREAD: interleaved off/on rounds (median)")
    return p


def benchmark(args: argparse.Namespace) -> dict:
    """Forward and forward+backward timings of the configured model: a JSON-able dict."""
    model = build(args)
    cfg = model.config
    clip = parse_shape(args.shape)
    T, H, W = clip.latent_size
    n_audio = clip.audio_tokens
    B, dev = args.batch, args.device
    video = torch.randn(B, cfg.latent_channels, T, H, W, device=dev)
    audio = torch.randn(B, n_audio, cfg.audio_in_channels, device=dev)
    text = torch.randn(B, args.text_len, cfg.text_in_channels, device=dev)
    layout = SequenceLayout(B, T, H // 2, W // 2, n_audio, args.text_len)
    autocast = torch.autocast(dev, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), autocast:
            model(video, audio, text)

    def forward_backward():
        with autocast:
            v, a = model(video, audio, text)
        (v.float().square().mean() + a.float().square().mean()).backward()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    flops_fwd = float(forward_flops(cfg, layout))
    results = {
        "preset": args.preset,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "seq_len": layout.seq_len,
        "batch": B,
        "dtype": args.dtype,
        "compile": args.compile,
        "device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu x{torch.get_num_threads()}",
    }
    for name, fn, flops in (
        ("forward", forward, flops_fwd),
        ("forward_backward", forward_backward, 3 * flops_fwd),
    ):
        seconds = time_steps(fn, args.steps, args.warmup, dev)
        tflops = flops / seconds / 1e12
        results[name] = {
            "s_per_step": round(seconds, 4),
            "tokens_per_s": round(layout.seq_len * B / seconds, 1),
            "tflops": round(tflops, 3),
            "mfu": round(tflops / args.peak_tflops, 4) if args.peak_tflops else None,
        }
    if dev == "cuda":
        results["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.tread:
        results["tread"] = tread_side_by_side(args, model, (video, audio, text), layout, autocast)
    return results


def tread_side_by_side(args, model: MagiHumanDiT, inputs, layout: SequenceLayout, autocast) -> dict:
    """Training steps (forward + backward) without and with TREAD routing, in interleaved rounds
    (the median of each: a shared machine's load hits both alike); tokens/s counts every token of
    the batch (all are in the loss), FLOPs the ones computed."""
    cfg, dev = model.config, args.device
    start, end = (int(i) for i in args.tread_layers.split(",")) if args.tread_layers else (None, None)
    tread = TreadConfig(rate=args.tread, start_layer=start, end_layer=end)
    gens = [torch.Generator(dev).manual_seed(i) for i in range(layout.batch)]
    route = tread.draw(gens, {"video": layout.n_video, "audio": layout.n_audio}, cfg.num_layers, dev)

    def step(r):
        def fn():
            with autocast:
                v, a = model(*inputs, route=r)
            (v.float().square().mean() + a.float().square().mean()).backward()

        return fn

    times = {"off": [], "tread": []}
    for _ in range(args.rounds):
        for name, r in (("off", None), ("tread", route)):
            times[name].append(time_steps(step(r), args.steps, args.warmup, dev))
    out = {"rate": args.tread, "layers": [route.start, route.end], "rounds": args.rounds}
    tokens = layout.seq_len * layout.batch
    for name, r in (("off", None), ("tread", route)):
        seconds = sorted(times[name])[len(times[name]) // 2]
        flops = 3 * float(forward_flops(cfg, layout, r))
        out[name] = {
            "s_per_step": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "computed_tflop_per_step": round(flops / 1e12, 5),
            "tflops": round(flops / seconds / 1e12, 3),
        }
    out["tokens_per_s_ratio"] = round(out["tread"]["tokens_per_s"] / out["off"]["tokens_per_s"], 3)
    out["computed_flops_ratio"] = round(
        out["tread"]["computed_tflop_per_step"] / out["off"]["computed_tflop_per_step"], 3
    )
    return out


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(benchmark(parser().parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
