"""Inference: the generation pipeline, checkpoint loading, output sizes, stage timings, benchmark."""

from .networks import load_network, random_network, to_inference_dtype
from .pipeline import Generation, MagiHumanPipeline, Sampling, TextInputs
from .shapes import RESOLUTIONS, ClipShape, parse_resolution
from .timing import StageTimer, format_table, write_json

__all__ = [
    "RESOLUTIONS",
    "ClipShape",
    "Generation",
    "MagiHumanPipeline",
    "StageTimer",
    "Sampling",
    "TextInputs",
    "format_table",
    "load_network",
    "parse_resolution",
    "random_network",
    "to_inference_dtype",
    "write_json",
]
