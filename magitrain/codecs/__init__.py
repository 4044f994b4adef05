"""Frozen codecs: Wan2.2 video VAE, Stable Audio Open VAE, T5Gemma text encoder, media helpers."""
