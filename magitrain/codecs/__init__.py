"""Frozen codecs: Wan2.2 video VAE, Stable Audio Open VAE, T5Gemma text encoder, media helpers."""

from magitrain.codecs.audio import AudioCodec, num_latent_frames
from magitrain.codecs.container import Codecs
from magitrain.codecs.pretrained import build_codecs
from magitrain.codecs.text import TextEncoder
from magitrain.codecs.tiny import build_tiny_codecs
from magitrain.codecs.video import VideoCodec

__all__ = [
    "AudioCodec", "Codecs", "TextEncoder", "VideoCodec", "build_codecs", "build_tiny_codecs",
    "num_latent_frames",
]  # fmt: skip
