"""Stack decoded samples of one bucket into the batch dict of the data contract (docs/data.md).

Tensors are stacked with torch's default_collate, which, inside a DataLoader worker, writes the
batch straight into shared memory: the hand-over to the main process then copies nothing.
"""

import torch
from torch.utils.data import default_collate

LIST_FIELDS = ("key", "caption", "language")


def audio_mask(samples: list[dict]) -> torch.Tensor:
    """[B] bool: False for a clip without audio whose audio loss is masked (data.missing_audio=mask)."""
    return torch.tensor([bool(s["audio_mask"]) for s in samples])


def collate_raw(samples: list[dict], sample_rate: int) -> dict:
    """video [B, 3, F, H, W] uint8, audio [B, C, S] float at `sample_rate`, audio_mask [B], the list
    fields; ref_image [B, 3, H, W] uint8 only if every sample has a KEY.jpg."""
    batch = {name: [s[name] for s in samples] for name in LIST_FIELDS}
    batch["video"] = default_collate([s["video"] for s in samples])
    batch["audio"] = default_collate([s["audio"] for s in samples])
    batch["audio_mask"] = audio_mask(samples)
    batch["sample_rate"] = sample_rate
    if all("ref_image" in s for s in samples):
        batch["ref_image"] = default_collate([s["ref_image"] for s in samples])
    return batch


def collate_latent(samples: list[dict]) -> dict:
    """video_latent [B, 48, T, H, W], audio_latent [B, N, 64], audio_mask [B], text_emb [B, L, C]
    zero-padded to the longest caption of the batch + text_len [B]; ref/lr latents only if every
    sample has them."""
    batch = {name: [s[name] for s in samples] for name in LIST_FIELDS}
    batch["video_latent"] = default_collate([s["video_latent"] for s in samples])
    batch["audio_latent"] = default_collate([s["audio_latent"] for s in samples])
    batch["audio_mask"] = audio_mask(samples)
    lengths = [s["text_emb"].shape[0] for s in samples]
    longest = max(lengths)
    batch["text_emb"] = default_collate(
        [
            torch.nn.functional.pad(s["text_emb"], (0, 0, 0, longest - n))
            for s, n in zip(samples, lengths, strict=True)
        ]
    )
    batch["text_len"] = torch.tensor(lengths, dtype=torch.long)
    for name in ("ref_latent", "lr_video_latent"):
        if all(name in s for s in samples):
            batch[name] = default_collate([s[name] for s in samples])
    return batch
