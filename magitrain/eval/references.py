"""The prompts file of `python -m magitrain.eval ... prompts=FILE`: which text each clip was made
from and what it should say.

It is the file infer.py generated the clips from (`infer.py prompts=P.jsonl out=dir/clip.mp4`
writes dir/clip_000.mp4, dir/clip_001.mp4, ...), so its rows pair with those clips as they are:
a row's `file` (or infer.py's `out`) names its clip; otherwise row i pairs with the clip whose
name ends in `_NNN` (i, three digits: infer.py's numbering), else with the i-th clip in sorted
order. Rows are JSON objects (.jsonl) with `prompt` and optional `speech`, `language`, `file`,
`voice` (the reference voice of speaker_similarity), and infer.py's `seed`, `image`,
`negative_prompt`, `out` (read, not used); any other file holds
one prompt per non-empty line, as infer.py reads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from magitrain.eval.clip import Reference


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
            references[name] = Reference(
                row["prompt"], row.get("speech"), row.get("language"), row.get("voice")
            )
    return references, notes


def _clip_of(row: dict, i: int, names: list[str]) -> str | None:
    named = row.get("file") or row.get("out")
    if named is not None:
        return Path(named).name if Path(named).name in names else None
    numbered = [n for n in names if re.search(rf"_{i:03d}$", Path(n).stem)]
    if len(numbered) == 1:
        return numbered[0]
    return names[i] if i < len(names) else None
