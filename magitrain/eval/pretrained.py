"""A model-based metric's weights: a local transformers folder loaded with its processor, or a
named error (what the folder should be) that the evaluator reports per clip."""

from __future__ import annotations

from pathlib import Path


def load_folder(path: str | Path, name: str, processor_cls, model_cls, device: str):
    """(processor, model in eval mode on `device`) of the transformers folder `path`; `name` (e.g.
    "Whisper") names the weights in the errors."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{name} weights: {path} is not a folder")
    try:
        processor = processor_cls.from_pretrained(path)
        model = model_cls.from_pretrained(path).to(device).eval()
    except (OSError, ValueError, TypeError) as exn:
        raise ValueError(f"{name} weights: {path} is not a transformers {name} folder ({exn})") from exn
    return processor, model
