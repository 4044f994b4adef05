"""The prompts file of `infer.py prompts=FILE`, which `python -m magitrain.eval ... prompts=FILE`
reads too (to pair each clip with its text): one prompt per non-empty line, or the JSON objects of
a .jsonl, `{"prompt": ..., "seed", "image", "audio", "video", "voice", "negative_prompt", "out",
"speech", "language", "file"}` (`audio`: audio-driven video from that file, `video`: video-to-audio,
`voice`: the voice reference of that clip).
`speech`, `language` and `file` are the evaluation's (the words a clip should say, their language,
the clip's file name); infer.py reads them and leaves them be. A bad row is a UserError naming the
file, the line and the key.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from magitrain.errors import UserError

ROW_KEYS = {
    "prompt": str,
    "speech": str,
    "language": str,
    "file": str,
    "seed": int,
    "image": str,
    "audio": str,
    "video": str,
    "voice": str,
    "negative_prompt": str,
    "out": str,
}


def read_prompt_rows(path: str | Path) -> list[dict]:
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
