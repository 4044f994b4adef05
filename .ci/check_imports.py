"""Every import the product needs loads on this install: run by .ci/run before the tests.

A broken wheel set (torchaudio 2.11.1 with torch 2.11.0: libtorchaudio.so fails to load) would
otherwise show up only as skipped or confusing test failures. Each failure is named.
"""

import importlib
import sys
import traceback

CHECKS = [
    ("torch", "torch"),
    ("torchaudio and libtorchaudio", "torchaudio"),
    ("diffusers AutoencoderKLWan (video VAE)", "diffusers:AutoencoderKLWan"),
    ("diffusers AutoencoderOobleck (audio VAE)", "diffusers:AutoencoderOobleck"),
    ("transformers T5Gemma (text encoder)", "transformers:T5GemmaEncoderModel"),
    ("lightning", "lightning.pytorch"),
    ("webdataset", "webdataset"),
    ("decord (video decoding)", "decord"),
    ("PyAV (mp4 muxing)", "av"),
    ("deepspeed", "deepspeed"),
    ("wandb", "wandb"),
    ("hydra", "hydra"),
    ("safetensors", "safetensors.torch"),
    ("magitrain and its codecs", "magitrain.codecs"),
]


def load(spec: str) -> None:
    module, _, attr = spec.partition(":")
    loaded = importlib.import_module(module)
    if attr:
        getattr(loaded, attr)
    if module == "torchaudio":  # loads libtorchaudio.so, which a mismatched torch cannot load
        from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE

        if not _IS_TORCHAUDIO_EXT_AVAILABLE:
            raise ImportError("torchaudio's compiled extension (_torchaudio, libtorchaudio) is missing")


failed = []
for what, spec in CHECKS:
    try:
        load(spec)
        print(f"ok      {what}")
    except Exception:
        failed.append(what)
        print(f"FAILED  {what} ({spec}):\n{traceback.format_exc(limit=2)}")
if failed:
    sys.exit(f"{len(failed)} product imports fail on this install: {', '.join(failed)}")
