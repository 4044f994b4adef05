"""Stage timings with device synchronisation, in the columns of the report's Table 2."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Table 2 of the report: total = base + SR + decode (text encoding and muxing are not in it).
COLUMNS = ("base", "sr", "decode")
HEADERS = {"output": "output", "base": "Base", "sr": "SR", "decode": "Decode", "total": "Total"}


class StageTimer:
    """`with timer("base"): ...` adds the stage's wall time in seconds to `timer.seconds`.

    The device is synchronised before and after each stage so that queued GPU work is charged
    to the stage that launched it.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def row(self, output: str) -> dict:
        """Table 2 row: output name, base, sr (None when no SR stage ran), decode, total, plus extras."""
        row = {"output": output, **{c: self.seconds.get(c) for c in COLUMNS}}
        row["total"] = sum(v for v in row.values() if isinstance(v, float))
        extras = {k: v for k, v in self.seconds.items() if k not in COLUMNS}
        return {**row, **extras}


def format_table(rows: list[dict]) -> str:
    """A Markdown table with the report's columns; '-' where a stage did not run."""

    def cell(value) -> str:
        return "-" if value is None else value if isinstance(value, str) else f"{value:.2f} s"

    lines = ["| " + " | ".join(HEADERS.values()) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in HEADERS) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, rows: list[dict], **meta) -> Path:
    path = Path(path)
    path.write_text(json.dumps({**meta, "columns": list(HEADERS), "rows": rows}, indent=2) + "\n")
    return path
