"""Writing shards: a tar plus its sidecar index, atomically, so re-runs can skip finished shards.

Used by data_tools/make_shards.py (raw), data_tools/encode_shards.py (latent), the tests and
the benchmark. A shard counts as finished when `NNNNNN.tar` exists under its final name: the
tar is written to a temp name, the index is written next, and the tar is renamed last.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from webdataset import TarWriter

from magitrain.data.index import latent_row, write_index


def shard_path(out_dir: str | Path, number: int) -> Path:
    return Path(out_dir) / f"{number:06d}.tar"


def write_shard(out_dir: str | Path, number: int, kind: str, samples: Iterable[tuple[dict, dict]]) -> Path:
    """`samples` yields (members, row): members `{"__key__": KEY, EXT: bytes, ...}` go into the tar,
    row is the sample's index row (docs/data.md); its "key", "bytes" and "offset" are filled in here."""
    final = shard_path(out_dir, number)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    rows = []
    with TarWriter(str(tmp), encoder=False, mtime=0) as writer:
        for members, row in samples:
            offset = writer.tarstream.offset  # where the sample's first member header starts
            writer.write(members)
            size = sum(len(v) for k, v in members.items() if not k.startswith("__"))
            rows.append({"key": members["__key__"], "bytes": size, "offset": offset, **row})
    write_index(str(final.with_suffix(".index.json")), kind, rows, tmp.stat().st_size)
    os.replace(tmp, final)
    return final


def latent_sample(key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(members, row) of a latent sample: `KEY.latents.safetensors` + `KEY.json`.

    tensors: video_latent [48, T, H, W], audio_latent [N, 64], text_emb [L, C] (real tokens only),
    optional ref_latent [48, 1, H, W] and lr_video_latent [48, T, h, w].
    """
    payload = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    members = {
        "__key__": key,
        "latents.safetensors": payload,
        "json": json.dumps(meta, ensure_ascii=False).encode(),
    }
    row = {
        **latent_row(payload),
        "language": str(meta.get("language", "")),
        **{k: meta[k] for k in ("duration", "width", "height", "has_audio") if k in meta},
        **({"speaker": str(meta["speaker"])} if "speaker" in meta else {}),
    }
    return members, row
