#!/usr/bin/env python
"""Pack clips + captions into webdataset tar shards with sidecar indexes (format: docs/data.md).

Input is either a folder of clips with sidecar captions
    clips/NAME.mp4  clips/NAME.json ({"caption": ..., "language": ...}) or clips/NAME.txt,
    optional clips/NAME.wav|flac|m4a (audio) and clips/NAME.jpg (reference image),
or a CSV / JSONL manifest with columns path, caption, language, and optional audio, image, speaker
(a speaker id: data.voice_reference.source=same_speaker draws references among a speaker's clips;
in a folder, NAME.json's "speaker") (relative paths are relative to the manifest; video_path, text,
audio_path, image_path are
accepted for them, and any other column is reported and kept in KEY.json as metadata). Every
clip (and its separate audio) is probed first; an unreadable one is reported and skipped, and if
no clip is left the command fails. Shards are cut by --max-count samples and --max-bytes and
written atomically (magitrain.data.writer), so re-running the same command skips finished
shards; the clip-to-shard plan is kept in OUT_DIR/make_shards.plan.json and a re-run with other
input stops.

    python data_tools/make_shards.py clips/ shards/raw/ --max-count 1000 --workers 8
"""

import argparse
import csv
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

from rich.progress import track

from magitrain.data.index import AUDIO_EXTS, probe_audio, probe_media
from magitrain.data.writer import shard_path, write_shard

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm")


def entries_from_folder(folder: Path) -> list[dict]:
    entries = []
    for video in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTS):
        entry = {"path": str(video)}
        meta_path, txt_path = video.with_suffix(".json"), video.with_suffix(".txt")
        if meta_path.exists():
            entry["meta_file"] = str(meta_path)
        elif txt_path.exists():
            entry["caption"] = txt_path.read_text().strip()
        for ext in AUDIO_EXTS:
            if video.with_suffix(f".{ext}").exists():
                entry["audio"] = str(video.with_suffix(f".{ext}"))
                break
        if video.with_suffix(".jpg").exists():
            entry["image"] = str(video.with_suffix(".jpg"))
        entries.append(entry)
    return entries


COLUMNS = ("path", "caption", "language", "audio", "image", "speaker")
ALIASES = {
    "video_path": "path", "video": "path", "file": "path", "text": "caption", "prompt": "caption",
    "audio_path": "audio", "wav": "audio", "image_path": "image", "lang": "language",
}  # fmt: skip


def manifest_columns(manifest: Path, columns: list[str]) -> dict[str, str]:
    """Column -> field; aliases map to their field, two columns for one field are an error, and
    columns we do not know are reported: they go into KEY.json as plain metadata."""
    fields, seen = {}, {}
    for column in columns:
        field = ALIASES.get(column.strip().lower(), column)
        if field in seen:
            raise SystemExit(
                f"{manifest}: columns {seen[field]!r} and {column!r} both give {field!r}: keep one"
            )
        fields[column], seen[field] = field, column
    extra = [c for c, f in fields.items() if f not in COLUMNS]
    if extra:
        print(
            f"{manifest}: columns {extra} are not among {list(COLUMNS)} (or the aliases "
            f"{sorted(ALIASES)}): stored in KEY.json as metadata, not used as media",
            file=sys.stderr,
        )
    return fields


def entries_from_manifest(manifest: Path) -> list[dict]:
    if manifest.suffix == ".csv":
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    fields = manifest_columns(manifest, list(dict.fromkeys(c for row in rows for c in row)))
    entries = []
    for i, row in enumerate(rows):
        entry = {fields[k]: v for k, v in row.items() if v not in (None, "")}
        if not entry.get("path"):
            raise SystemExit(f"{manifest}: row {i + 1} has no 'path' (or 'video_path') column")
        for field in ("path", "audio", "image"):
            if field in entry and not os.path.isabs(entry[field]):
                entry[field] = str(manifest.parent / entry[field])
        entries.append(entry)
    return entries


def probe_entry(entry: dict) -> dict:
    """The entry with its metadata filled in, or with an "error" saying why it is unusable."""
    try:
        meta = json.loads(Path(entry["meta_file"]).read_text()) if "meta_file" in entry else {}
        if not isinstance(meta, dict):
            raise ValueError(f"{entry['meta_file']} is not a JSON object")
        meta.update({k: v for k, v in entry.items() if k not in ("path", "meta_file", "audio", "image")})
        if not isinstance(meta.get("caption"), str):
            raise ValueError("no caption (NAME.json 'caption', NAME.txt, or the manifest's caption column)")
        meta.update(probe_media(entry["path"]))
        if "audio" in entry:  # a separate audio file wins over the mp4's track
            meta.update(probe_audio(entry["audio"]), has_audio=True)
        meta["source"] = entry["path"]
        size = sum(os.path.getsize(entry[f]) for f in ("path", "audio", "image") if f in entry)
        return {**entry, "meta": meta, "bytes": size}
    except Exception as exn:  # unreadable clip or caption: reported, never fatal
        return {**entry, "error": f"{type(exn).__name__}: {exn}"}


def plan_shards(entries: list[dict], max_count: int, max_bytes: int) -> list[list[dict]]:
    shards, current, size = [], [], 0
    for entry in entries:
        if current and (len(current) >= max_count or size + entry["bytes"] > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry["bytes"]
    if current:
        shards.append(current)
    return shards


def shard_members(number: int, entries: list[dict], key_digits: int):
    """(members, index row) per clip, keyed video2dataset-style: shard number + index in shard."""
    for i, entry in enumerate(entries):
        meta = entry["meta"]
        members = {
            "__key__": f"{number:06d}{i:0{key_digits}d}",
            "mp4": Path(entry["path"]).read_bytes(),
            "json": json.dumps(meta, ensure_ascii=False).encode(),
        }
        if "audio" in entry:
            members[Path(entry["audio"]).suffix[1:].lower()] = Path(entry["audio"]).read_bytes()
        if "image" in entry:
            members["jpg"] = Path(entry["image"]).read_bytes()
        yield (
            members,
            {
                **{k: meta[k] for k in ("duration", "width", "height", "fps", "has_audio")},
                **{k: meta[k] for k in ("audio_start", "audio_duration") if k in meta},
                "language": str(meta.get("language", "")),
                **({"speaker": str(meta["speaker"])} if "speaker" in meta else {}),
            },
        )


def check_plan(out_dir: Path, shards: list[list[dict]]) -> None:
    """Record which clips go to which shard; a re-run must plan the same, or finished shards would
    silently disagree with the new ones (clips lost or packed twice)."""
    plan = [[entry["path"] for entry in shard] for shard in shards]
    path = out_dir / "make_shards.plan.json"
    if path.exists() and json.loads(path.read_text()) != plan:
        raise SystemExit(
            f"{out_dir} was started from other input or limits ({path} differs): "
            "use a new output folder, or delete it to start over"
        )
    path.write_text(json.dumps(plan))


def write_job(job: tuple[Path, int, list[dict], int]) -> str:
    out_dir, number, entries, key_digits = job
    return write_shard(out_dir, number, "raw", shard_members(number, entries, key_digits)).name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="folder of clips, or a .csv / .jsonl manifest")
    parser.add_argument("out_dir", type=Path, help="where NNNNNN.tar + NNNNNN.index.json go")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard (default 1e9)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    args = parser.parse_args(argv)

    if args.input.is_dir():
        entries = entries_from_folder(args.input)
    elif args.input.suffix in (".csv", ".jsonl"):
        entries = entries_from_manifest(args.input)
    else:
        raise SystemExit(f"input {args.input} is neither a folder nor a .csv/.jsonl manifest")
    if not entries:
        raise SystemExit(f"no clips ({', '.join(VIDEO_EXTS)}) found in {args.input}")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    with Pool(args.workers) as pool:
        probed = list(
            track(
                pool.imap(probe_entry, entries, chunksize=4), total=len(entries), description="probing clips"
            )
        )
        good = [e for e in probed if "error" not in e]
        for e in probed:
            if "error" in e:
                print(f"skipped {e['path']}: {e['error']}", file=sys.stderr)
        if not good:
            raise SystemExit(
                f"nothing to write: all {len(probed)} clips of {args.input} were skipped (see above)"
            )
        shards = plan_shards(good, args.max_count, int(args.max_bytes))
        check_plan(args.out_dir, shards)
        digits = len(str(max(len(s) for s in shards) - 1)) if shards else 1
        jobs = [
            (args.out_dir, n, s, digits)
            for n, s in enumerate(shards)
            if not shard_path(args.out_dir, n).exists()
        ]
        for _ in track(pool.imap_unordered(write_job, jobs), total=len(jobs), description="writing shards"):
            pass
    print(
        f"{len(good)} clips in {len(shards)} shards ({len(shards) - len(jobs)} already done), "
        f"{len(probed) - len(good)} skipped -> {args.out_dir}"
    )


if __name__ == "__main__":
    from magitrain.cli import command_line

    with command_line():
        main()
