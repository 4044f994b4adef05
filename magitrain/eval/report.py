"""The markdown reports of `python -m magitrain.eval ... report=FILE.md` (one run, or a compare),
with a thumbnail strip (PNG) per clip written beside the report and linked from it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from magitrain.eval.clip import Clip
from magitrain.eval.stats import is_number

STRIP_FRAMES = 5
STRIP_HEIGHT = 96


def thumbnail_strip(frames: np.ndarray, count: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> Image.Image:
    """`count` frames spread evenly over the clip (first to last), each `height` pixels high, side
    by side."""
    picks = np.unique(np.linspace(0, len(frames) - 1, count).round().astype(int))
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    tiles = [Image.fromarray(frames[i]).resize((width, height), Image.BILINEAR) for i in picks]
    strip = Image.new("RGB", (width * len(tiles), height))
    for j, tile in enumerate(tiles):
        strip.paste(tile, (j * width, 0))
    return strip


class Strips:
    """Writes each clip's thumbnail strip to `<report stem>_thumbs/` as the evaluator reads it
    (`Evaluator.run(..., on_clip=strips)`: no second decode); `links` maps clip names to the
    strips' paths relative to the report."""

    def __init__(self, report: Path, tag: str = ""):
        self.folder = report.with_name(f"{report.stem}_thumbs")
        self.tag = tag
        self.links: dict[str, str] = {}

    def __call__(self, clip: Clip) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        png = self.folder / f"{Path(clip.name).stem}{self.tag}.png"
        thumbnail_strip(clip.frames).save(png)
        self.links[clip.name] = quote(f"{self.folder.name}/{png.name}")  # a space would end the link


def _value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or not is_number(value):
        return str(value)
    return f"{value:.4g}"


def _interval(stat: dict) -> str:
    low, high = stat["ci95"]
    return f"{_value(stat['mean'])} [{_value(low)}, {_value(high)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def write_report(report: Path, result: dict, strips: dict[str, str]) -> None:
    """The report of one run: aggregates (mean [95% CI], n), per-clip metrics, errors, strips."""
    report.parent.mkdir(parents=True, exist_ok=True)
    clips, agg = result["clips"], result["aggregate"]
    metrics = list(agg)
    lines = [f"# Clip evaluation ({len(clips)} clips)", "", "## Aggregates (mean [95% bootstrap CI])", ""]
    lines += _table(
        ["metric", "mean [95% CI]", "n"], [[m, _interval(agg[m]), str(agg[m]["n"])] for m in metrics]
    )
    lines += ["", "## Clips", ""]
    rows = [
        [name, *(_value(row.get(m)) for m in metrics), "; ".join(_notes(row))] for name, row in clips.items()
    ]
    lines += _table(["clip", *metrics, "error / skipped"], rows)
    lines += ["", "## Frames", ""]
    for name, link in strips.items():
        lines += [f"**{name}**", "", f"![{name}]({link})", ""]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_compare_report(
    report: Path, result: dict, strips_a: dict[str, str], strips_b: dict[str, str]
) -> None:
    """The report of a compare: per-metric A, B and the paired delta B - A with its CI; per-clip
    deltas; unmatched clips; strips of A above B."""
    report.parent.mkdir(parents=True, exist_ok=True)
    a, b, delta = result["a"]["aggregate"], result["b"]["aggregate"], result["delta"]
    lines = [f"# Compare: A = {result['a']['source']}, B = {result['b']['source']}", ""]
    lines += ["## Metrics (mean [95% bootstrap CI]; delta over the clips both have)", ""]
    rows = [
        [m, _interval(a[m]) if m in a else "–", _interval(b[m]) if m in b else "–", _interval(d), str(d["n"])]
        for m, d in delta.items()
    ]
    lines += _table(["metric", "A", "B", "B - A", "n pairs"], rows)
    lines += ["", "## Clips (B - A)", ""]
    metrics = list(delta)
    rows = [[name] + [_value(result["clips"][name].get(m)) for m in metrics] for name in result["clips"]]
    lines += _table(["clip", *metrics], rows)
    for side in ("a_only", "b_only"):
        if result["unmatched"][side]:
            lines += ["", f"Only in {side[0].upper()}: " + ", ".join(result["unmatched"][side])]
    lines += ["", "## Frames (A above B)", ""]
    for name in result["clips"]:
        lines += [f"**{name}**", ""]
        for side, links in (("A", strips_a), ("B", strips_b)):
            lines += [f"![{name} {side}]({links[name]})", ""] if name in links else []
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _notes(row: dict) -> list[str]:
    return [f"{key}: {row[key]}" for key in ("error", "skipped") if key in row]
