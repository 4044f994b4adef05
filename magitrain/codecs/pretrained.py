"""Build the real codecs from local folders in the libraries' own formats, never from the network.

- `video_vae_path`: a diffusers `AutoencoderKLWan` folder (`vae/` of Wan-AI/Wan2.2-TI2V-5B-Diffusers,
  or the released `.pth` converted with diffusers' script, see docs/codecs.md),
- `audio_vae_path`: a diffusers `AutoencoderOobleck` folder (`vae/` of stabilityai/stable-audio-open-1.0),
- `text_encoder_path`: a transformers T5Gemma folder with its tokenizer (google/t5gemma-9b-9b-ul2),
- `turbo_vaed_path` (with `video_decoder: turbo`): the release's Turbo-VAED, either its `.ckpt`
  (with the JSON config beside it or at `turbo_vaed_config`) or a folder `TurboVAED.save_pretrained`
  wrote.
A missing or wrong folder fails here, naming the config field and the path.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck
from transformers import AutoTokenizer, T5GemmaEncoderModel

from magitrain.codecs.audio import AudioCodec
from magitrain.codecs.container import Codecs, check_video_decoder
from magitrain.codecs.text import TextEncoder, read_prompt_file
from magitrain.codecs.turbo_vaed import TurboVAED, TurboVideoDecoder
from magitrain.codecs.video import VideoCodec
from magitrain.errors import UserError

TURBO_CLASS_NAMES = ("TurboVAED", "AutoencoderKLTurboVAED")  # ours; the name in the released JSON


def build_codecs(
    video_vae_path: str,
    audio_vae_path: str,
    text_encoder_path: str,
    vae_dtype: str = "bfloat16",
    audio_dtype: str = "float32",
    text_dtype: str = "bfloat16",
    text_output_dtype: str = "float16",
    negative_prompt: str = "",
    negative_prompt_file: str | None = None,
    decode_tile: int | None = None,
    audio_window_seconds: float = 29.0,
    text_offload: bool = False,
    offload: bool = False,
    video_decoder: str = "wan",
    turbo_vaed_path: str | None = None,
    turbo_vaed_config: str | None = None,
    device: str = "cpu",
) -> Codecs:
    """Load the three frozen codecs (`local_files_only`: no hub access) and move them to `device`.

    `video_decoder: turbo` decodes generated clips with Turbo-VAED from `turbo_vaed_path` (in
    `vae_dtype`); encoding always uses the Wan2.2 VAE. `negative_prompt_file` replaces
    `negative_prompt` with a file's text (e.g. the release's long negative prompt).
    """
    if negative_prompt_file is not None:
        negative_prompt = read_prompt_file(negative_prompt_file, "codecs.negative_prompt_file")
    check_video_decoder(video_decoder)
    video_dir = checked_dir("video_vae_path", video_vae_path, "_class_name", "AutoencoderKLWan")
    audio_dir = checked_dir("audio_vae_path", audio_vae_path, "_class_name", "AutoencoderOobleck")
    text_dir = checked_dir("text_encoder_path", text_encoder_path, "model_type", "t5gemma")
    turbo = None
    if video_decoder == "turbo":
        turbo = TurboVideoDecoder(load_turbo_vaed(turbo_vaed_path, turbo_vaed_config, _dtype(vae_dtype)))
    video = _load("video_vae_path", AutoencoderKLWan, video_dir, dtype=_dtype(vae_dtype))
    audio = _load("audio_vae_path", AutoencoderOobleck, audio_dir, dtype=_dtype(audio_dtype))
    # The released checkpoint is the full encoder-decoder; load only its encoder half.
    model = _load(
        "text_encoder_path", T5GemmaEncoderModel, text_dir, dtype=_dtype(text_dtype), is_encoder_decoder=False
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        msg = f"codecs.text_encoder_path: no usable tokenizer in {text_dir}: {err}"
        raise FileNotFoundError(msg) from err
    text = TextEncoder(
        model,
        tokenizer,
        negative_prompt=negative_prompt,
        offload=text_offload,
        output_dtype=_dtype(text_output_dtype),
    )
    codecs = Codecs(
        VideoCodec(video, decode_tile=decode_tile),
        AudioCodec(audio, window_seconds=audio_window_seconds),
        text,
        video_decoder=turbo,
        offload=offload,
    )
    return codecs.to(device)


def load_turbo_vaed(path: str | None, config: str | None, dtype: torch.dtype) -> TurboVAED:
    """Turbo-VAED from the release's `.ckpt` (+ JSON) or from a `save_pretrained` folder, strictly."""
    field = "turbo_vaed_path"
    if not path:
        raise UserError(
            f"codecs.{field} is not set: video_decoder: turbo (the release's default) needs the Turbo-VAED "
            f"checkpoint (the release's turbo_vae/); codecs.video_decoder=wan decodes with Wan2.2 instead"
        )
    path = Path(path).expanduser()
    if path.is_file():
        if config is None:
            found = sorted(path.parent.glob("*.json"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"codecs.{field}: {path.parent} holds {len(found)} .json files, not the one Turbo-VAED "
                    f"config: set codecs.turbo_vaed_config"
                )
            config = found[0]
        return TurboVAED.from_release(path, config, dtype=dtype, field=field)
    folder = checked_dir(field, str(path), "_class_name", TURBO_CLASS_NAMES)
    model, info = TurboVAED.from_pretrained(
        folder, local_files_only=True, output_loading_info=True, torch_dtype=dtype
    )
    bad = {kind: sorted(info[f"{kind}_keys"])[:5] for kind in ("missing", "unexpected", "mismatched")}
    if any(bad.values()):
        raise ValueError(f"codecs.{field}: {folder} does not hold exactly a TurboVAED: {bad}")
    return model.eval().requires_grad_(False)


def checked_dir(field: str, path: str | None, key: str, expected: str | tuple[str, ...]) -> Path:
    """The folder of config field `codecs.<field>`, once its config.json says `key: expected` (one of)."""
    if not path:
        raise ValueError(f"codecs.{field} is not set (a local {expected} folder is required)")
    folder = Path(path).expanduser()
    config = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"codecs.{field}: {folder} does not exist or is not a directory")
    if not config.is_file():
        raise FileNotFoundError(
            f"codecs.{field}: {folder} has no config.json (expected a {expected} folder "
            f"in the library's format; see docs/codecs.md)"
        )
    found = json.loads(config.read_text()).get(key)
    if found not in ((expected,) if isinstance(expected, str) else expected):
        raise ValueError(f"codecs.{field}: {config} has {key}={found!r}, expected {expected!r}")
    return folder


def _load(field: str, cls, folder: Path, **kwargs):
    """`cls.from_pretrained` offline, failing on missing weights: both libraries would otherwise
    initialise them at random and only log it. Unexpected keys are fine (T5Gemma's decoder half)."""
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    missing, mismatched = info["missing_keys"], info["mismatched_keys"]
    if missing or mismatched:
        raise ValueError(
            f"codecs.{field}: {folder} does not hold a complete {cls.__name__}: "
            f"missing {sorted(missing)[:5]}, mismatched {list(mismatched)[:5]}"
        )
    return model


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"codecs: unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return dtype
