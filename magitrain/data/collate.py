"""Stack decoded samples of one bucket into the batch dict of the data contract (docs/data.md).

In a DataLoader worker the batch is written straight into shared memory, so the hand-over to the
main process copies nothing. Fresh shared memory is expensive, though: allocating it (torch
reserves every page) and the first write to each page cost about three times the copy itself,
more than reading a latent sample. A worker therefore writes its batches into a `SharedRing` of
a few slots that it reuses once the main process has dropped the batch that used a slot.
"""

import weakref

import torch
from torch import Tensor

LIST_FIELDS = ("key", "caption", "language")
PADDED = ("text_emb", "ref_audio_latent")  # rows zero-padded to the batch's longest
ALIGN = 64


class SharedRing:
    """Batch buffers in shared memory that one DataLoader worker reuses, and when it may.

    `counts` [2, slots] int64 in shared memory (made by the main process before the workers
    start): row 0 counts the batches the worker handed out from each slot, row 1 those the main
    process has dropped again (`release_when_dropped`, run on every batch the loader yields; each
    row has one writer). A slot is reused only when the two agree, so a batch the training loop
    (or anyone) still holds is never overwritten; when no slot is free the batch goes to fresh
    shared memory, as torch's default_collate does. The storage grows when a batch does not fit.
    """

    def __init__(self, counts: Tensor):
        self.counts, self.slots = counts, counts.shape[1]
        self.slot_bytes, self.slot, self.offset = 0, None, 0
        self.buffer: Tensor | None = None

    def begin(self, nbytes: int) -> None:
        free = [s for s in range(self.slots) if self.counts[0, s] == self.counts[1, s]]
        if nbytes > self.slot_bytes and len(free) == self.slots:  # grow only when nothing is lent
            self.slot_bytes = -(-int(nbytes * 1.25) // 4096) * 4096
            storage = torch.UntypedStorage._new_shared(self.slot_bytes * self.slots)
            self.buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.slot = free[0] if free and nbytes <= self.slot_bytes else None
        self.offset = 0 if self.slot is None else self.slot * self.slot_bytes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.slot is None:
            return torch.empty(shape, dtype=dtype).share_memory_()
        n = _nbytes(shape, dtype)
        view = self.buffer[self.offset : self.offset + n].view(dtype).view(shape)
        self.offset += -(-n // ALIGN) * ALIGN
        return view

    def lend(self, slot: int) -> None:
        """Count one more hand-out of the batch in `slot` (a batch may be yielded twice)."""
        self.counts[0, slot] += 1


def release_when_dropped(batch: dict, counts: Tensor, slot: int) -> None:
    """Main process: count the batch's slot as returned once all its tensors are garbage."""
    tensors = [v for v in batch.values() if torch.is_tensor(v)]
    pending = [len(tensors)]

    def drop() -> None:
        pending[0] -= 1
        if pending[0] == 0:
            counts[1, slot] += 1

    for tensor in tensors:
        weakref.finalize(tensor, drop)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _stack(fields: dict[str, list[Tensor]], ring: SharedRing | None) -> dict[str, Tensor]:
    """Stack each field's tensors; `PADDED` fields' rows are zero-padded to the longest."""
    shapes = {}
    for name, tensors in fields.items():
        rows = max(t.shape[0] for t in tensors) if name in PADDED else tensors[0].shape[0]
        shapes[name] = (len(tensors), rows, *tensors[0].shape[1:])
    if ring is not None:
        ring.begin(sum(-(-_nbytes(s, fields[k][0].dtype) // ALIGN) * ALIGN for k, s in shapes.items()))
    out = {}
    for name, tensors in fields.items():
        dtype = tensors[0].dtype
        target = (
            ring.take(shapes[name], dtype) if ring is not None else torch.empty(shapes[name], dtype=dtype)
        )
        if name in PADDED:
            for row, t in zip(target, tensors, strict=True):
                row[: t.shape[0]].copy_(t)
                row[t.shape[0] :].zero_()
        else:
            torch.stack(tensors, out=target)
        out[name] = target
    return out


def _field(sample: dict, name: str) -> Tensor:
    if name == "latent_shape" and name not in sample:  # a latent sample in a prompt batch
        return torch.tensor(sample["video_latent"].shape[1:], dtype=torch.long)
    return sample[name]


def audio_mask(samples: list[dict]) -> torch.Tensor:
    """[B] bool: False for a clip without audio whose audio loss is masked (data.missing_audio=mask)."""
    return torch.tensor([bool(s["audio_mask"]) for s in samples])


def collate_raw(samples: list[dict], sample_rate: int, ring: SharedRing | None = None) -> dict:
    """video [B, 3, F, H, W] uint8, audio [B, C, S] float at `sample_rate`, audio_mask [B], the list
    fields; ref_image [B, 3, H, W] uint8 only if every sample has a KEY.jpg."""
    names = ["video", "audio"] + (["ref_image"] if all("ref_image" in s for s in samples) else [])
    batch = {name: [s[name] for s in samples] for name in LIST_FIELDS}
    batch |= _stack({name: [s[name] for s in samples] for name in names}, ring)
    batch["audio_mask"] = audio_mask(samples)
    batch["sample_rate"] = sample_rate
    return batch


def collate_latent(samples: list[dict], ring: SharedRing | None = None) -> dict:
    """video_latent [B, 48, T, H, W], audio_latent [B, N, 64], audio_mask [B], text_emb [B, L, C]
    zero-padded to the longest caption of the batch + text_len [B]; ref/lr latents only if every
    sample has them; a voice reference (data.voice_reference) as ref_audio_latent [B, R, 64] padded
    to the longest + ref_audio_len [B] (0: the sample has none). A batch with a prompt sample (no
    video) is a prompt batch: latent_shape [B, 3] instead of the video and audio latents."""
    names = [n for n in ("video_latent", "audio_latent") if all(n in s for s in samples)]
    if not names:  # prompt samples (data/prompts.py): the geometry to generate instead
        names = ["latent_shape"]
    optional = ("ref_latent", "lr_video_latent", "ref_audio_latent")
    names += ["text_emb"] + [n for n in optional if all(n in s for s in samples)]
    batch = {name: [s[name] for s in samples] for name in LIST_FIELDS}
    batch |= _stack({name: [_field(s, name) for s in samples] for name in names}, ring)
    batch["text_len"] = torch.tensor([s["text_emb"].shape[0] for s in samples], dtype=torch.long)
    if "ref_audio_latent" in batch:
        batch["ref_audio_len"] = torch.tensor([s["ref_audio_latent"].shape[0] for s in samples])
    batch["audio_mask"] = audio_mask(samples)
    return batch
