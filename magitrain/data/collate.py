"""Stack decoded samples of one bucket into the batch dict of the data contract (docs/data.md)."""

import torch

LIST_FIELDS = ("key", "caption", "language")


def collate_raw(samples: list[dict], sample_rate: int) -> dict:
    """video [B, 3, F, H, W] in [-1, 1], audio [B, C, S] at `sample_rate`, plus the list fields."""
    batch = {name: [s[name] for s in samples] for name in LIST_FIELDS}
    batch["video"] = torch.stack([s["video"] for s in samples])
    batch["audio"] = torch.stack([s["audio"] for s in samples])
    batch["sample_rate"] = sample_rate
    return batch


def collate_latent(samples: list[dict]) -> dict:
    """video_latent [B, 48, T, H, W], audio_latent [B, N, 64], text_emb [B, L, C] zero-padded to the
    longest caption of the batch + text_len [B]; ref/lr latents only if every sample has them."""
    batch = {name: [s[name] for s in samples] for name in LIST_FIELDS}
    batch["video_latent"] = torch.stack([s["video_latent"] for s in samples])
    batch["audio_latent"] = torch.stack([s["audio_latent"] for s in samples])
    lengths = [s["text_emb"].shape[0] for s in samples]
    first = samples[0]["text_emb"]
    text = first.new_zeros(len(samples), max(lengths), first.shape[1])
    for i, s in enumerate(samples):
        text[i, : lengths[i]] = s["text_emb"]
    batch["text_emb"], batch["text_len"] = text, torch.tensor(lengths, dtype=torch.long)
    for name in ("ref_latent", "lr_video_latent"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch
