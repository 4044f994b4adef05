"""Prompt adherence (`clip_score`): how well a few frames of the clip match its prompt, as a local
transformers CLIP sees them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor

from magitrain.eval.clip import Clip, ClipError, Reference
from magitrain.eval.pretrained import load_folder


def frame_indices(count: int, frames: int) -> np.ndarray:
    """`frames` indices evenly spaced over `count` frames (the middles of equal segments), all of them
    when the clip is shorter."""
    frames = min(frames, count)
    return ((np.arange(frames) + 0.5) * count / frames).astype(int)


class ClipScore:
    """`metric(clip, reference) -> {"clip_score"}`: over `frames` evenly spaced frames, the mean of
    `100 * max(cos, 0)`, cos the cosine similarity of CLIP's embeddings of `reference.prompt` and of
    the frame. That is the common "CLIPScore" scale (torchmetrics' `CLIPScore`; Hessel et al. 2021 use
    a weight of 2.5 instead of 100): 0 to 100, higher is better.

    `path`: a local transformers CLIP folder (e.g. `openai/clip-vit-large-patch14`). Prompts longer
    than CLIP's text window (77 tokens) are truncated: only their start is scored. Frames go through
    the processor's resize and centre crop, so the picture's borders of a wide frame are not seen.
    """

    def __init__(self, path: str | Path, device: str = "cpu", frames: int = 8):
        self.processor, self.model = load_folder(path, "CLIP", CLIPProcessor, CLIPModel, device)
        self.device, self.frames = device, frames

    @torch.no_grad()
    def metric(self, clip: Clip, reference: Reference) -> dict[str, float]:
        if not reference.prompt.strip():
            raise ClipError(f"{clip.name}: no prompt to compute clip_score against")
        images = list(clip.frames[frame_indices(len(clip.frames), self.frames)])
        inputs = self.processor(
            text=[reference.prompt],
            images=images,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.device)
        out = self.model(**inputs)  # text_embeds, image_embeds: unit vectors
        cosine = (out.image_embeds @ out.text_embeds.T).squeeze(1)
        return {"clip_score": float((100 * cosine.clamp(min=0)).mean())}
