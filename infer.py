"""Generate a clip with sound, or benchmark the pipeline: `python infer.py key=value ...`.

    python infer.py ckpt=/ckpt/distill prompt="A woman laughs" seconds=5 resolution=256p \
        sr=1080p sr_ckpt=/ckpt/sr1080 steps=8 seed=1 out=outputs/laugh.mp4 \
        codecs_args.video_vae_path=/ckpt/wan22_vae codecs_args.audio_vae_path=/ckpt/sao_vae \
        codecs_args.text_encoder_path=/ckpt/t5gemma
    python infer.py benchmark=true model=magihuman_15b compile=true out=outputs/bench.json

Keys are the fields of `InferConfig` below; `ckpt` may be a released-layout or exported directory,
a .safetensors file or a Lightning training checkpoint (see magitrain/inference/networks.py).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent
log = logging.getLogger("magitrain")


@dataclass
class InferConfig:
    ckpt: str | None = None  # base (or distilled) network
    prompt: str | None = None
    image: str | None = None  # reference image: image-to-video
    seconds: float = 5.0
    resolution: str = "256p"  # base stage: 256p | 540p | 1080p | WIDTHxHEIGHT
    sr: str = "none"  # none | 540p | 1080p | WIDTHxHEIGHT
    sr_ckpt: str | None = None
    steps: int = 8  # 8: distilled sampler; 32: UniPC with CFG
    sampler: str | None = None  # distilled | base (default from steps)
    seed: int = 0
    negative_prompt: str | None = None  # default: the codecs config's negative prompt
    out: str = "outputs/infer/sample.mp4"  # benchmark: the JSON path
    model: str | None = None  # preset; default: the folder's config.json (exports), else magihuman_15b
    sr_model: str | None = None  # default: config.json, else magihuman_15b_sr540 / magihuman_15b_sr1080
    weights: str = "auto"  # Lightning checkpoints: auto (EMA if saved) | ema | raw
    codecs: str = "magihuman"  # conf/codecs/NAME.yaml or a YAML path; benchmark: random (full size) too
    codecs_args: dict = field(default_factory=dict)  # overrides of the codecs config's fields
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp32
    offload: str = "none"  # none | codecs | stages (each network on the device only for its stage)
    compile: bool = False
    benchmark: bool = False
    bench_rows: list = field(default_factory=lambda: ["none", "540p", "1080p"])
    bench_repeats: int = 2
    text_tokens: int = 100  # benchmark: random prompt embedding length


def parse(argv: list[str]) -> InferConfig:
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"infer.py takes key=value arguments, got {bad}; see InferConfig in {__file__}")
    cfg = OmegaConf.merge(OmegaConf.structured(InferConfig), OmegaConf.from_dotlist(argv))
    return OmegaConf.to_object(cfg)


def build_codecs(name: str, args: dict, dtype: torch.dtype):
    if name == "random":
        from magitrain.inference.benchmark import random_codecs

        return random_codecs(dtype, **args)  # codecs_args.decode_tile=512 bounds 1080p decode memory
    path = Path(name) if name.endswith((".yaml", ".yml")) else REPO / "conf" / "codecs" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"codecs={name}: no {path} (use tiny, magihuman or a YAML path)")
    return hydra.utils.instantiate(OmegaConf.merge(OmegaConf.load(path), args))


def optional(value: str | None) -> str | None:
    return None if value in (None, "", "none", "None") else value


def generate(cfg: InferConfig, device: torch.device) -> None:
    from magitrain.inference import MagiHumanPipeline, compile_blocks, load_network
    from magitrain.inference.pipeline import uses_bf16

    if not cfg.ckpt or not cfg.prompt:
        raise SystemExit("infer.py needs ckpt=PATH and prompt=TEXT (or benchmark=true)")
    sr = optional(cfg.sr)
    if sr and not cfg.sr_ckpt:
        raise SystemExit(f"sr={sr} needs sr_ckpt=PATH (the SR network)")
    dtype = torch.bfloat16 if uses_bf16(cfg.precision, device) else torch.float32
    model = load_network(cfg.ckpt, cfg.model, cfg.weights, dtype=dtype)
    sr_preset = "magihuman_15b_sr1080" if sr == "1080p" else "magihuman_15b_sr540"
    sr_model = (
        load_network(cfg.sr_ckpt, cfg.sr_model, cfg.weights, "sr_ckpt", dtype, sr_preset) if sr else None
    )
    for network in filter(None, (model, sr_model)):
        network.eval().requires_grad_(False).to(device if cfg.offload != "stages" else "cpu")
        if cfg.compile:
            compile_blocks(network)
    codecs = build_codecs(cfg.codecs, cfg.codecs_args, dtype)
    pipe = MagiHumanPipeline(
        model, codecs, sr_model, device=device, precision=cfg.precision, offload=cfg.offload
    )
    result = pipe.generate(
        cfg.prompt, seconds=cfg.seconds, resolution=cfg.resolution, sr=sr, steps=cfg.steps,
        sampler=cfg.sampler, seed=cfg.seed, image=cfg.image, negative_prompt=cfg.negative_prompt,
    )  # fmt: skip
    path = result.save(cfg.out)
    print(result.table())
    print(f"wrote {path} and {path.with_suffix('.json')}")


def benchmark(cfg: InferConfig, device: torch.device) -> None:
    from magitrain.inference import format_table, write_json
    from magitrain.inference.benchmark import run_benchmark
    from magitrain.inference.pipeline import uses_bf16

    bf16 = uses_bf16(cfg.precision, device)
    codecs = build_codecs(cfg.codecs, cfg.codecs_args, torch.bfloat16 if bf16 else torch.float32)
    preset = cfg.model or "magihuman_15b"
    rows = run_benchmark(
        preset, tuple(cfg.bench_rows), seconds=cfg.seconds, resolution=cfg.resolution, codecs=codecs,
        device=device, precision=cfg.precision, compile=cfg.compile, text_tokens=cfg.text_tokens,
        repeats=cfg.bench_repeats,
    )  # fmt: skip
    print(format_table(rows))
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    out = Path(cfg.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rows, model=preset, seconds=cfg.seconds, compile=cfg.compile, machine=machine)
    print(f"wrote {out}")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    (benchmark if cfg.benchmark else generate)(cfg, device)


if __name__ == "__main__":
    main(sys.argv[1:])
