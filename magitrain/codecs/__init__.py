"""Frozen codecs: Wan2.2 video VAE, Turbo-VAED (decode only), Stable Audio Open VAE, T5Gemma text
encoder, media helpers.

Exports resolve lazily so that `magitrain.codecs.media` (imported by data-loader workers) does not
pull in diffusers and transformers.
"""

import importlib

_EXPORTS = {
    "AudioCodec": "audio",
    "num_latent_frames": "audio",
    "Codecs": "container",
    "build_codecs": "pretrained",
    "TextEncoder": "text",
    "TurboVAED": "turbo_vaed",
    "TurboVideoDecoder": "turbo_vaed",
    "build_tiny_codecs": "tiny",
    "VideoCodec": "video",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
