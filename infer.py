r"""Generate clips with sound, or benchmark the pipeline: `python infer.py key=value ... [--verbose]`.

    python infer.py ckpt=/ckpt/distill prompt="A woman laughs: hello!" seconds=5 resolution=256p \
        sr=1080p sr_ckpt=/ckpt/sr1080 steps=8 seed=1 out=outputs/laugh.mp4 codecs=magihuman \
        codecs.video_vae_path=/ckpt/wan22_vae codecs.audio_vae_path=/ckpt/sao_vae \
        codecs.text_encoder_path=/ckpt/t5gemma
    python infer.py ckpt=/ckpt/distill prompts=prompts.jsonl out=outputs/batch/clip.mp4 ...
    python infer.py ckpt=/ckpt/distill prompt="..." audio=speech.wav image=face.jpg out=outputs/talk.mp4
    python infer.py benchmark=true model=magihuman_15b codecs=random compile=step out=outputs/bench.json
    torchrun --nproc-per-node 4 infer.py ckpt=... sr=1080p sr_ckpt=... cp=4 out=outputs/clip.mp4

Each argument is KEY=VALUE, split at the first '=': text values (prompts, paths) are taken
verbatim, whatever characters they hold; numbers and flags are converted to the key's type.
`ckpt` may be a released-layout or exported directory, a .safetensors file or a Lightning training
checkpoint (see magitrain/inference/networks.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from magitrain.cli import command_line
from magitrain.errors import UserError
from magitrain.inference.steps import COMPILE_MODES
from magitrain.prompt_file import read_prompt_rows

REPO = Path(__file__).resolve().parent
log = logging.getLogger("magitrain")


def arg(default, doc: str, key: str | None = None):
    """An InferConfig field with its one-line doc (shown by --help) and, if it differs, its CLI key."""
    meta = {"doc": doc, "key": key}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class InferConfig:
    ckpt: str | None = arg(None, "base (or distilled) network: released/exported folder, .safetensors, .ckpt")
    prompt: str | None = arg(None, "the text of one clip, verbatim (any characters)")
    prompts: str | None = arg(
        None, "a file: one prompt per line, or .jsonl rows {prompt, seed, image, audio, video, ...}"
    )
    image: str | None = arg(None, "reference image: image-to-video")
    audio: str | None = arg(None, "audio-driven video: this speech (wav/mp3/flac/m4a) kept clean, video made")
    video: str | None = arg(None, "video-to-audio: this clip's pictures kept clean, its audio made")
    audio_out: str = arg("given", "mp4 track of audio=: given (its samples) | decoded (the VAE round trip)")
    voice: str | None = arg(
        None, "voice reference: the speech takes this speaker's voice (any audio file, 1-10 s)"
    )
    voice_scale: float = arg(1.0, "voice= guidance: CFG against no reference (1: the reference alone)")
    seconds: float | None = arg(None, "clip length (default 5; with audio=, video=: theirs, cut to this)")
    resolution: str = arg("256p", "base stage size: 256p | 540p | 1080p | WIDTHxHEIGHT")
    sr: str = arg("none", "super-resolution target: none | 540p | 1080p | WIDTHxHEIGHT")
    sr_ckpt: str | None = arg(None, "the SR network's checkpoint (needed with sr=)")
    lora: str | None = arg(None, "LoRA adapter file(s) applied to the base at load time: PATH or [PATH,...]")
    lora_scale: str = arg("1.0", "LoRA scale: one for all adapters, or [S1,S2,...] one per adapter")
    sr_lora: str | None = arg(None, "LoRA adapter file(s) applied to the SR network (recipe=lora_sr_*)")
    sr_lora_scale: str = arg("1.0", "SR LoRA scale(s), like lora_scale")
    steps: int | None = arg(None, "denoising steps (default: what ckpt was trained for, else 8)")
    sampler: str | None = arg(
        None, "distilled | base (default: ckpt's; else 8 steps: distilled, 32: UniPC with CFG)"
    )
    seed: int = arg(0, "noise seed (a CPU generator: the same noise on any device)")
    negative_prompt: str | None = arg(None, "CFG's negative prompt, verbatim (default: the codecs config's)")
    negative_prompt_file: str | None = arg(None, "CFG's negative prompt read from a UTF-8 text file")
    guidance_video: float = arg(5.0, "base CFG: video scale while the timestep t > guidance_switch_t")
    guidance_video_low: float = arg(2.0, "base CFG: video scale from guidance_switch_t on")
    guidance_switch_t: int = arg(500, "base CFG: the timestep (of 1000) where the video scale switches")
    guidance_audio: float = arg(5.0, "base CFG: audio scale")
    sr_steps: int | None = arg(None, "SR stage: steps (default: what sr_ckpt was trained for, else 5)")
    sr_sampler: str | None = arg(
        None, "SR stage: unipc (released) | distilled (recipe=sr_dmd2_*; default: sr_ckpt's, else unipc)"
    )
    sr_noise_value: int = arg(220, "SR stage: re-noise at this DDPM step (220: signal 0.8389; 0: none)")
    sr_cfg: bool = arg(
        False, "SR stage with CFG against the negative prompt (the release can; off as shipped)"
    )
    sr_guidance: float = arg(3.5, "sr_cfg: video scale")
    sr_cfg_trick: bool = arg(True, "sr_cfg: at most 2.0 on the first 13 latent frames (the release's trick)")
    generator_device: str = arg("cpu", "where the noise is drawn: cpu (any machine, same noise) | cuda")
    output_size: str | None = arg(
        None, "resize the decoded frames to WIDTHxHEIGHT (after Decode, as released)"
    )
    upsample_mode: str = arg("bilinear", "output_size's filter: bilinear | nearest | bicubic")
    out: str = arg("outputs/infer/sample.mp4", "the mp4 (prompts=: NAME_000.mp4, ...); benchmark: the JSON")
    latents_out: str | None = arg(
        None,
        "the final latents too: FILE.safetensors, video [48,T,H,W], audio [N,64] (prompts=: FILE_000...)",
    )
    decode: bool = arg(True, "false: no decode stage and no mp4, only latents_out=")
    model: str | None = arg(
        None, "architecture preset (default: the folder's config.json, else magihuman_15b)"
    )
    sr_model: str | None = arg(
        None, "SR architecture: 540p | 1080p | a preset (default: sr_ckpt's config.json, else by output size)"
    )
    weights: str = arg("auto", "Lightning checkpoints: auto (EMA if saved) | ema | raw")
    codecs: str = arg("magihuman", "conf/codecs/NAME.yaml or a YAML path; benchmark: random too")
    codecs_fields: dict = arg(
        {}, "a field of the codecs config (codecs.video_vae_path=...)", "codecs.FIELD=VALUE"
    )
    device: str = arg("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    precision: str = arg("auto", "auto (bf16 on CUDA) | bf16 | fp32")
    offload: str = arg("none", "none | codecs | stages (each network on the device only for its stage)")
    compile: str = arg("none", "none | blocks (each transformer layer) | step (the whole denoising step)")
    cp: int = arg(1, "context parallel: split each DiT forward over N ranks (torchrun --nproc-per-node N)")
    benchmark: bool = arg(False, "time the Table 2 rows with random weights instead of generating")
    bench_rows: list = arg(
        ["none", "540p", "1080p"], "benchmark: the SR targets after a 256p base stage (a2v: audio-driven)"
    )
    bench_repeats: int = arg(2, "benchmark: timed runs per row (after one warm-up)")
    text_tokens: int = arg(300, "benchmark: random prompt embedding length (like a 150-250-word prompt)")


FIELDS = {f.name: f for f in dataclasses.fields(InferConfig)}


def help_text() -> str:
    lines = [__doc__.strip(), "", "keys (the fields of InferConfig) with their defaults:"]
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = f"[{','.join(default)}]" if isinstance(default, list) else default
        key = f.metadata["key"] or f"{name}={shown}"
        lines.append(f"  {key:<28} {f.metadata['doc']}")
    lines.append(f"  {'--verbose':<28} full tracebacks for errors in the arguments or files")
    return "\n".join(lines)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: str, tp, key: str):
    """`value` as the type `tp` of `key`: strings verbatim, else a clear error naming the key."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        inner = next(a for a in args if a is not type(None))
        if inner is not str and value.lower() in ("none", "null", ""):
            return None
        return convert(value, inner, key)
    if tp in (str, inspect.Parameter.empty, typing.Any):
        return value
    if tp is bool:
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{key}={value}: expected true or false")
    if tp in (list, typing.List) or typing.get_origin(tp) is list:  # noqa: UP006
        items = value.strip().removeprefix("[").removesuffix("]")
        return [item.strip() for item in items.split(",") if item.strip()]
    if tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            raise UserError(f"{key}={value}: expected {'an integer' if tp is int else 'a number'}") from None
    raise UserError(f"{key}: values of type {_type_name(tp)} cannot be given on the command line")


def parse(argv: list[str]) -> InferConfig:
    hints = typing.get_type_hints(InferConfig)
    values, codecs_fields = {}, {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"infer.py takes key=value arguments, got {item!r}: see `python infer.py --help`")
        if key.startswith("codecs."):
            codecs_fields[key.removeprefix("codecs.")] = value  # typed once the codecs config is known
        elif key in FIELDS and not FIELDS[key].metadata["key"]:
            values[key] = convert(value, hints[key], key)
        else:
            close = difflib.get_close_matches(key, list(FIELDS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if "." in key:
                hint = " (a codecs field is codecs.FIELD=VALUE)"
            raise UserError(f"unknown key {key!r}{hint}: see `python infer.py --help`")
    cfg = InferConfig(**values, codecs_fields=codecs_fields)
    cfg.compile = {"true": "blocks", "false": "none"}.get(cfg.compile.lower(), cfg.compile)  # the old flag
    if cfg.compile not in COMPILE_MODES:
        raise UserError(f"compile={cfg.compile}: expected one of {', '.join(COMPILE_MODES)}")
    return cfg


def build_codecs(name: str, fields: dict[str, str], dtype: torch.dtype):
    """The codecs of `codecs=NAME` with `codecs.FIELD=VALUE` overrides typed by the builder's signature."""
    import hydra
    from omegaconf import OmegaConf

    if name == "random":
        from magitrain.inference.benchmark import random_codecs

        return random_codecs(dtype, **_typed_fields(name, random_codecs, {}, fields, skip=("dtype",)))
    path = Path(name) if name.endswith((".yaml", ".yml")) else REPO / "conf" / "codecs" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"codecs={name}: no {path} (use tiny, magihuman, random or a YAML path)")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    target = hydra.utils.get_method(config.pop("_target_"))
    config.update(_typed_fields(name, target, config, fields))
    unset = [key for key, value in config.items() if value == "???"]
    if unset:
        needed = " ".join(f"codecs.{key}=PATH" for key in unset)
        raise UserError(f"codecs={name} needs {needed} (see docs/codecs.md)")
    return target(**config)  # not hydra's instantiate: it would read '${' in a path as interpolation


def _typed_fields(name: str, target, config: dict, fields: dict[str, str], skip=()) -> dict:
    params = {k: p for k, p in inspect.signature(target).parameters.items() if k not in skip}
    hints = typing.get_type_hints(target)
    unknown = sorted(set(fields) - set(params))
    if unknown:
        raise UserError(f"codecs={name} has no field {unknown[0]!r}; its fields: {', '.join(params)}")
    return {k: convert(v, hints.get(k, str), f"codecs.{k}") for k, v in fields.items()}


def optional(value: str | None) -> str | None:
    return None if value in (None, "", "none", "None") else value


def sampling(cfg: InferConfig, sr: tuple[int, str] = (5, "unipc")):
    """The pipeline's `Sampling` of the guidance and SR keys (the release's values by default);
    `sr`: the SR stage's (steps, sampler), `sr_sampling_for`'s."""
    from magitrain.flow import Guidance
    from magitrain.inference import Sampling

    guidance = Guidance(cfg.guidance_video, cfg.guidance_video_low, cfg.guidance_switch_t, cfg.guidance_audio)
    trick = Sampling.sr_cfg_trick_value if cfg.sr_cfg_trick else None
    steps, sampler = sr
    return Sampling(
        guidance, steps, cfg.sr_noise_value, cfg.sr_cfg, cfg.sr_guidance, sr_cfg_trick_value=trick,
        sr_sampler=sampler,
    )  # fmt: skip


def sr_sampling_for(cfg: InferConfig) -> tuple[int, str]:
    """The SR stage's (steps, sampler): the ones given, else those sr_ckpt was trained for (an SR
    student's config.json: distilled, 2 steps), else the release's 5 UniPC steps."""
    from magitrain.flow.sr import SR_SAMPLERS
    from magitrain.inference.networks import recorded_sampling

    recorded = (recorded_sampling(cfg.sr_ckpt, "sr") if cfg.sr_ckpt else None) or {}
    sampler = cfg.sr_sampler or recorded.get("sampler", "unipc")
    if sampler not in SR_SAMPLERS:
        raise UserError(f"sr_sampler={sampler}: expected one of {', '.join(SR_SAMPLERS)}")
    if sampler == "distilled" and cfg.sr_cfg:
        raise UserError("sr_cfg=true: a distilled SR student samples without CFG (sr_sampler=distilled)")
    steps = cfg.sr_steps or (recorded["steps"] if recorded.get("sampler") == sampler else 5)
    if steps < 1:
        raise UserError(f"sr_steps={steps}: must be >= 1")
    return steps, sampler


def negative_prompt(cfg: InferConfig) -> str | None:
    """`negative_prompt=TEXT`, or the text of `negative_prompt_file=PATH` (one trailing newline dropped)."""
    if cfg.negative_prompt_file is None:
        return cfg.negative_prompt
    if cfg.negative_prompt is not None:
        raise UserError("give negative_prompt=TEXT or negative_prompt_file=PATH, not both")
    from magitrain.codecs.text import read_prompt_file

    try:
        return read_prompt_file(cfg.negative_prompt_file, "negative_prompt_file")
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None


def check_output(cfg: InferConfig) -> None:
    """output_size / upsample_mode errors before any network loads."""
    from magitrain.codecs.media import UPSAMPLE_MODES
    from magitrain.inference.shapes import parse_output_size

    if cfg.upsample_mode not in UPSAMPLE_MODES:
        raise UserError(f"upsample_mode={cfg.upsample_mode}: expected one of {', '.join(UPSAMPLE_MODES)}")
    if cfg.output_size is not None:
        try:
            parse_output_size(cfg.output_size)
        except ValueError as err:
            raise UserError(str(err)) from None


def check_latents_out(cfg: InferConfig) -> None:
    """latents_out / decode errors before any network loads."""
    if cfg.latents_out is not None and Path(cfg.latents_out).suffix != ".safetensors":
        raise UserError(f"latents_out={cfg.latents_out}: expected a FILE.safetensors")
    if not cfg.decode and cfg.latents_out is None:
        raise UserError("decode=false writes no mp4: give latents_out=FILE.safetensors for the latents")


def numbered(path: str, i: int, suffix: str) -> str:
    """The i-th file of a prompts=FILE run: NAME_000.SUFFIX, NAME_001.SUFFIX, ..."""
    return str(Path(path).with_name(f"{Path(path).stem}_{i:03d}{Path(path).suffix or suffix}"))


def jobs(cfg: InferConfig) -> list[dict]:
    """(prompt, seed, image, audio, video, voice, negative_prompt, out, latents) of every clip."""
    base = {"seed": cfg.seed, "image": cfg.image, "audio": cfg.audio, "video": cfg.video, "voice": cfg.voice}
    base["negative_prompt"] = negative_prompt(cfg)
    if cfg.prompts is None:
        return [{**base, "prompt": cfg.prompt, "out": cfg.out, "latents": cfg.latents_out}]
    if cfg.prompt is not None:
        raise UserError("give prompt=TEXT or prompts=FILE, not both")
    return [
        {
            **base,
            "out": numbered(cfg.out, i, ".mp4"),
            "latents": cfg.latents_out and numbered(cfg.latents_out, i, ".safetensors"),
            **row,
        }
        for i, row in enumerate(read_prompt_rows(cfg.prompts))
    ]


def load_checked(ckpt: str, model: str | None, weights: str, key: str, dtype: torch.dtype, fallback=None):
    """`load_network`, whose ValueError / KeyError name the key and the file: a user's error here."""
    from magitrain.inference import load_network

    try:
        return load_network(ckpt, model, weights, key, dtype, fallback or "magihuman_15b")
    except (ValueError, KeyError) as err:
        raise UserError(err.args[0] if err.args else str(err)) from err


def with_adapters(network, paths: str, scales: str, key: str):
    """`network` with the adapter files `key=` applied at their `key_scale=` (nothing merged on disk)."""
    from magitrain.lora import apply_adapters

    scales = [convert(s, float, f"{key}_scale") for s in convert(scales, list, f"{key}_scale")]
    return apply_adapters(network, convert(paths, list, key), scales, key)


SR_MODELS = {"540p": "magihuman_15b_sr540", "1080p": "magihuman_15b_sr1080"}


def sr_architecture(sr: str, sr_model: str | None) -> tuple[str | None, str]:
    """(the preset asked for, the fallback) of the SR network. Decided by the checkpoint, never by how
    `sr` is spelt: `sr_model=` when given (540p | 1080p | a preset), else the checkpoint's own config
    (load_network), else the output's size class: a short side of 1024 pixels or more is 1080p's."""
    from magitrain.inference import parse_resolution

    try:
        short_side = min(parse_resolution(sr))
    except ValueError as err:
        raise UserError(f"sr={sr}: {err}") from None
    return SR_MODELS.get(sr_model, sr_model), SR_MODELS["1080p" if short_side >= 1024 else "540p"]


def load_sr_network(cfg: InferConfig, sr: str, dtype: torch.dtype):
    """The SR network (see `sr_architecture`), its attention pattern logged."""
    preset, by_size = sr_architecture(sr, cfg.sr_model)
    network = load_checked(cfg.sr_ckpt, preset, cfg.weights, "sr_ckpt", dtype, by_size)
    local, layers = network.config.local_attn_layers, network.config.num_layers
    source = f"sr_model={cfg.sr_model}" if preset else f"sr_ckpt's config, else {by_size} for sr={sr}"
    attention = f"local attention in {len(local)} of {layers} layers" if local else "full attention"
    log.info("SR network (%s): %s", source, attention)
    return network


def check_cp(degree: int, network, key: str) -> None:
    """A CP degree splits the heads: it must divide the network's kv heads."""
    from magitrain.parallel.context_parallel import check_degree

    if network is None:
        return
    try:
        check_degree(network.config, degree)
    except ValueError as err:
        raise UserError(f"cp={degree} does not fit the {key} network: {err}") from err


def sampling_for(cfg: InferConfig) -> tuple[int, str]:
    """(steps, sampler): the ones given, else those ckpt was trained for (its config.json or
    hyper-parameters: a DMD-2 student's 8 distilled steps), else the released defaults."""
    from magitrain.inference.networks import recorded_sampling
    from magitrain.inference.pipeline import DEFAULT_SAMPLER, SAMPLERS

    recorded = recorded_sampling(cfg.ckpt) or {}
    sampler = cfg.sampler or recorded.get("sampler")
    if sampler is None:
        sampler = DEFAULT_SAMPLER.get(cfg.steps) if cfg.steps else "distilled"
    if sampler not in SAMPLERS:
        given = f"sampler={cfg.sampler}" if cfg.sampler else f"steps={cfg.steps} has no default sampler"
        raise UserError(f"{given}: pass sampler= one of {', '.join(SAMPLERS)}")
    default_steps = {name: steps for steps, name in DEFAULT_SAMPLER.items()}[sampler]
    steps = cfg.steps or (recorded.get("steps") if recorded.get("sampler") == sampler else default_steps)
    return steps, sampler


def generate(cfg: InferConfig, device: torch.device, group) -> None:
    from magitrain.inference import MagiHumanPipeline, format_table, write_json
    from magitrain.inference.given import check_given
    from magitrain.inference.pipeline import AUDIO_OUTS, uses_bf16

    if not cfg.ckpt or (cfg.prompt is None and cfg.prompts is None):
        raise UserError("infer.py needs ckpt=PATH and prompt=TEXT or prompts=FILE (or benchmark=true)")
    check_latents_out(cfg)
    todo = jobs(cfg)
    sr = optional(cfg.sr)
    check_output(cfg)
    if cfg.audio_out not in AUDIO_OUTS:
        raise UserError(f"audio_out={cfg.audio_out}: expected one of {', '.join(AUDIO_OUTS)}")
    for job in todo:  # before any network loads
        check_given(job["audio"], job["video"], job["image"], sr, job["voice"])
    if sr and not cfg.sr_ckpt:
        raise UserError(f"sr={sr} needs sr_ckpt=PATH (the SR network)")
    if cfg.sr_lora and not sr:
        raise UserError("sr_lora= adapts the SR network: it needs sr=SIZE and sr_ckpt=PATH")
    dtype = torch.bfloat16 if uses_bf16(cfg.precision, device) else torch.float32
    codecs = build_codecs(cfg.codecs, cfg.codecs_fields, dtype)  # before the networks: its errors are cheap
    model = load_checked(cfg.ckpt, cfg.model, cfg.weights, "ckpt", dtype)
    steps, sampler = sampling_for(cfg)
    if cfg.lora:
        model = with_adapters(model, cfg.lora, cfg.lora_scale, "lora")
    sr_model = load_sr_network(cfg, sr, dtype) if sr else None
    if cfg.sr_lora:
        sr_model = with_adapters(sr_model, cfg.sr_lora, cfg.sr_lora_scale, "sr_lora")
    for network in filter(None, (model, sr_model)):
        network.eval().requires_grad_(False).to(device if cfg.offload != "stages" else "cpu")
    for key, network in (("ckpt", model), ("sr_ckpt", sr_model)):
        check_cp(cfg.cp, network, key)
    pipe = MagiHumanPipeline(
        model, codecs, sr_model, device=device, precision=cfg.precision, offload=cfg.offload,
        group=group, compile=cfg.compile, generator_device=cfg.generator_device,
        sampling=sampling(cfg, sr_sampling_for(cfg)),
    )  # fmt: skip
    rows = []
    for job in todo:
        result = pipe.generate(
            job["prompt"], seconds=cfg.seconds, resolution=cfg.resolution, sr=sr, steps=steps,
            sampler=sampler, seed=job["seed"], image=job["image"], audio=job["audio"], video=job["video"],
            negative_prompt=job["negative_prompt"], output_size=cfg.output_size,
            upsample_mode=cfg.upsample_mode, decode=cfg.decode, audio_out=cfg.audio_out,
            voice=job["voice"], voice_scale=cfg.voice_scale,
        )  # fmt: skip
        if result is None:  # a CP rank other than 0: rank 0 writes
            continue
        if job["latents"]:
            print(f"wrote {result.save_latents(job['latents'])}")
        path = result.save(job["out"]) if cfg.decode else Path(job["latents"])
        rows.append({**result.timings, "file": str(path), "prompt": job["prompt"], "seed": job["seed"]})
        if cfg.decode:
            print(f"wrote {path} and {path.with_suffix('.json')}")
    if not rows:
        return
    print(format_table(rows))
    if cfg.prompts is not None and cfg.decode:
        summary = write_json(Path(cfg.out).with_suffix(".json"), rows, prompts=cfg.prompts)
        print(f"wrote {summary} (the timings of all {len(rows)} clips)")


def benchmark(cfg: InferConfig, device: torch.device, group) -> None:
    from magitrain.inference import format_table, write_json
    from magitrain.inference.benchmark import run_benchmark
    from magitrain.inference.pipeline import DEFAULT_SECONDS, uses_bf16

    bf16 = uses_bf16(cfg.precision, device)
    codecs = build_codecs(cfg.codecs, cfg.codecs_fields, torch.bfloat16 if bf16 else torch.float32)
    preset, seconds = cfg.model or "magihuman_15b", cfg.seconds or DEFAULT_SECONDS
    rows = run_benchmark(
        preset, tuple(cfg.bench_rows), seconds=seconds, resolution=cfg.resolution, codecs=codecs,
        device=device, precision=cfg.precision, compile=cfg.compile, text_tokens=cfg.text_tokens,
        repeats=cfg.bench_repeats, group=group,
    )  # fmt: skip
    if rows is None:  # a CP rank other than 0
        return
    print(format_table(rows))
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    out = Path(cfg.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rows, model=preset, seconds=seconds, compile=cfg.compile, cp=cfg.cp, machine=machine)
    print(f"wrote {out}")


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(help_text())
        return
    cfg = parse(argv)
    from magitrain.inference.distributed import launch_context_parallel

    try:
        group, device = launch_context_parallel(cfg.cp, cfg.device)
    except ValueError as err:
        raise UserError(str(err)) from err
    try:
        (benchmark if cfg.benchmark else generate)(cfg, device, group)
    finally:
        if group is not None:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    with command_line():
        main(sys.argv[1:])
