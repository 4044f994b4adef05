"""Scores of latents generated for the learnable class toy (`synthetic.make_class_latent_dataset`),
in latent space, against the toy's prototypes and held-out data; `scripts/dmd_toy.py` and
`scripts/quality_toy.py` report them.

- `class_accuracy`: the share of samples whose nearest video prototype (mean squared error) is the
  class their prompt names;
- `pairing_accuracy`: the share whose nearest audio prototype is the class of their video;
- `video_distance`, `audio_distance`: the mean per-element RMS distance to the prompt's prototypes;
- `voice_accuracy` (the voice toy, `synthetic.make_voice_latent_dataset`): the share of generated
  audio whose nearest voice (over the time-mean of its latents) is the reference's speaker;
- `sw_distance`: the sliced Wasserstein-2 distance between the generated samples of a class and as
  many held-out samples of it (video and audio flattened into one vector), averaged over classes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nearest(prototypes: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(the nearest prototype's index [B], the RMS distance to every prototype [B, K]) of samples
    `x` [B, ...] to `prototypes` [K, ...]."""
    rms = (x.float().flatten(1)[:, None] - prototypes.float().flatten(1)[None]).pow(2).mean(2).sqrt()
    return rms.argmin(1), rms


def class_scores(video: Tensor, audio: Tensor, classes: Tensor, prototypes: dict[str, Tensor]) -> dict:
    """class_accuracy, pairing_accuracy, video_distance, audio_distance of generated latents
    `video` [B, 48, T, H, W] and `audio` [B, N, 64] whose prompts named `classes` [B]."""
    rows = torch.arange(len(classes))
    video_class, video_rms = nearest(prototypes["video"], video)
    audio_class, audio_rms = nearest(prototypes["audio"], audio)
    return {
        "class_accuracy": (video_class == classes).float().mean().item(),
        "pairing_accuracy": (audio_class == video_class).float().mean().item(),
        "video_distance": video_rms[rows, classes].mean().item(),
        "audio_distance": audio_rms[rows, classes].mean().item(),
    }


def voice_accuracy(audio: Tensor, speakers: Tensor, voices: Tensor) -> float:
    """The share of generated audio latents [B, N, 64] whose time-mean's nearest voice of `voices`
    [K, 64] is the reference's speaker `speakers` [B]."""
    return (nearest(voices, audio.float().mean(1))[0] == speakers).float().mean().item()


def projections(dim: int, count: int, seed: int) -> Tensor:
    """[dim, count] unit directions drawn from `seed`: the same slices for every network scored."""
    directions = torch.randn(dim, count, generator=torch.Generator().manual_seed(seed))
    return directions / directions.norm(dim=0, keepdim=True)


def sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 between two equal-sized sets of vectors [n, D]: the root mean square, over
    the directions [D, L] and the sorted projections, of the 1-D optimal transport's displacements."""
    if x.shape != y.shape:
        raise ValueError(
            f"sliced_wasserstein needs equal-sized sets, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    a, b = (x.float() @ directions).sort(0).values, (y.float() @ directions).sort(0).values
    return (a - b).pow(2).mean().sqrt().item()


def sw_distance(generated: dict[str, Tensor], data: dict[str, Tensor], classes: Tensor, directions) -> float:
    """Per-class sliced Wasserstein between generated latents and held-out data, averaged over the
    classes: `generated` and `data` {"video": [B, ...], "audio": [B, ...]} share the labels `classes`."""
    flat = {k: torch.cat([v["video"].flatten(1), v["audio"].flatten(1)], 1) for k, v in
            (("generated", generated), ("data", data))}  # fmt: skip
    per_class = [
        sliced_wasserstein(flat["generated"][classes == c], flat["data"][classes == c], directions)
        for c in classes.unique()
    ]
    return sum(per_class) / len(per_class)
