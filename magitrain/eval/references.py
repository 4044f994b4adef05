"""The prompts file of `python -m magitrain.eval ... prompts=FILE`: which text each clip was made
from and what it should say.

It is the file infer.py generated the clips from (`infer.py prompts=P.jsonl out=dir/clip.mp4`
writes dir/clip_000.mp4, dir/clip_001.mp4, ...), so its rows pair with those clips as they are:
a row's `file` (or infer.py's `out`) names its clip; otherwise row i pairs with the clip whose
name ends in `_NNN` (i, three digits: infer.py's numbering), else with the i-th clip in sorted
order. Rows are JSON objects (.jsonl) with `prompt` and optional `speech`, `language`, `file`,
and infer.py's `seed`, `image`, `negative_prompt`, `out` (read, not used); any other file holds
one prompt per non-empty line, as infer.py reads it.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from magitrain.errors import UserError
from magitrain.eval.clip import Reference

ROW_KEYS = {
    "prompt": str,
    "speech": str,
    "language": str,
    "file": str,
    "seed": int,
    "image": str,
    "negative_prompt": str,
    "out": str,
}


def read_rows(path: str) -> list[dict]:
    """The rows of a prompts file; a bad row is a UserError naming the file, line and key."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts={path}: no such file")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix != ".jsonl":
        rows = [{"prompt": line} for line in lines if line.strip()]
    else:
        rows = [_row(file, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise UserError(f"prompts={path} holds no prompt")
    return rows


def _row(file: Path, number: int, line: str) -> dict:
    where = f"prompts={file} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UserError(f'{where}: expected an object with a "prompt" string, got {line.strip()[:60]}')
    row = {key: value for key, value in row.items() if value is not None}
    for key, value in row.items():
        if key not in ROW_KEYS:
            close = difflib.get_close_matches(key, list(ROW_KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(ROW_KEYS)})"
            raise UserError(f"{where}: unknown key {key!r}{hint}")
        if not isinstance(value, ROW_KEYS[key]) or isinstance(value, bool):
            raise UserError(f"{where}: {key} must be a {ROW_KEYS[key].__name__}, got {value!r}")
    return row


def pair(rows: list[dict], clip_names: list[str]) -> tuple[dict[str, Reference], list[str]]:
    """({clip name: its Reference}, notes on rows that found no clip). Clips without a row are
    left out (they are scored without a reference: no WER, no CLIP score)."""
    names = sorted(clip_names)
    references, notes = {}, []
    for i, row in enumerate(rows):
        name = _clip_of(row, i, names)
        if name is None:
            notes.append(
                f"prompts row {i + 1} ({row.get('file') or row.get('out') or 'by order'}): no such clip"
            )
        elif name in references:
            notes.append(f"prompts row {i + 1}: clip {name} already has a row; this one is ignored")
        else:
            references[name] = Reference(row["prompt"], row.get("speech"), row.get("language"))
    return references, notes


def _clip_of(row: dict, i: int, names: list[str]) -> str | None:
    named = row.get("file") or row.get("out")
    if named is not None:
        return Path(named).name if Path(named).name in names else None
    numbered = [n for n in names if re.search(rf"_{i:03d}$", Path(n).stem)]
    if len(numbered) == 1:
        return numbered[0]
    return names[i] if i < len(names) else None
