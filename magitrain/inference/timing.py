"""Stage timings with device synchronisation, in the columns of the report's Table 2, and the
peak device memory of each stage."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Table 2 of the report: total = base + SR + decode (text encoding and muxing are not in it).
COLUMNS = ("base", "sr", "decode")
HEADERS = {"output": "output", "base": "Base", "sr": "SR", "decode": "Decode", "total": "Total"}
GIB = 2**30


class CudaMemory:
    """The CUDA caching allocator's counters of one device, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class StageTimer:
    """`with timer("base"): ...` adds the stage's wall time in seconds to `timer.seconds` and, on
    CUDA, its peak allocated memory in GiB to `timer.peak_gib` (the maximum over repeated entries).

    The device is synchronised before and after each stage so that queued GPU work is charged
    to the stage that launched it. Stages may nest (`decode` holds `decode_video` and
    `decode_audio`): an outer stage's peak includes its inner stages'. `memory` is the counter
    source (default: the CUDA allocator on CUDA, none elsewhere).
    """

    def __init__(self, device: torch.device | str, memory: CudaMemory | None = None):
        self.device = torch.device(device)
        self.memory = memory if memory is not None or self.device.type != "cuda" else CudaMemory(self.device)
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}
        self._open: list[list] = []  # [stage, running peak in bytes] of the stages entered, outermost first
        self.warmup_seconds: dict[str, float] = {}
        self._excluded: list[float] = []  # warm-up seconds inside each open stage, outermost first

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        self._enter_memory(stage)
        start = time.perf_counter()
        self._excluded.append(0.0)
        try:
            yield
        finally:
            self._sync()
            excluded = self._excluded.pop()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start - excluded
            self._exit_memory(stage)

    @contextmanager
    def warmup(self, stage: str):
        """First-call costs inside a stage (compilation): their seconds go to `warmup_seconds[stage]`
        and are left out of every enclosing stage's seconds."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - start
            self.warmup_seconds[stage] = self.warmup_seconds.get(stage, 0.0) + seconds
            self._excluded = [e + seconds for e in self._excluded]

    def _enter_memory(self, stage: str) -> None:
        if self.memory is None:
            return
        # the allocator keeps one peak counter: fold it into the open stages before resetting it
        for entry in self._open:
            entry[1] = max(entry[1], self.memory.peak())
        self.memory.reset_peak()
        self._open.append([stage, self.memory.allocated()])

    def _exit_memory(self, stage: str) -> None:
        if self.memory is None:
            return
        _, running = self._open.pop()
        peak = max(running, self.memory.peak())
        for entry in self._open:
            entry[1] = max(entry[1], peak)
        self.peak_gib[stage] = max(self.peak_gib.get(stage, 0.0), peak / GIB)

    def row(self, output: str) -> dict:
        """Table 2 row: output name, base, sr (None when no SR stage ran), decode, total, plus extras
        (other stages' seconds; `peak_gib` per stage when memory was measured; `warmup` seconds per
        stage when a compiled step warmed up, not in the stages' seconds nor the total)."""
        row = {"output": output, **{c: self.seconds.get(c) for c in COLUMNS}}
        row["total"] = sum(v for v in row.values() if isinstance(v, float))
        extras = {k: v for k, v in self.seconds.items() if k not in COLUMNS}
        if self.peak_gib:
            extras["peak_gib"] = dict(self.peak_gib)
        if self.warmup_seconds:
            extras["warmup"] = dict(self.warmup_seconds)
        return {**row, **extras}


def format_table(rows: list[dict]) -> str:
    """A Markdown table with the report's columns; '-' where a stage did not run. Rows that name
    their video decoder or carry peak memory get those columns too."""
    headers = dict(HEADERS)
    if any("decoder" in row for row in rows):
        headers["decoder"] = "Decoder"
    if any("peak_gib" in row for row in rows):
        headers["peak"] = "Peak GiB base / SR / decode"
    if any(any(row.get("peak_gib_ranks") or ()) for row in rows):
        headers["ranks"] = "Peak GiB per CP rank"

    def cell(row: dict, key: str) -> str:
        if key == "ranks":
            return " / ".join(f"{max(p.values()):.1f}" if p else "-" for p in row.get("peak_gib_ranks") or ())
        if key == "peak":
            peaks = row.get("peak_gib") or {}
            return " / ".join("-" if peaks.get(c) is None else f"{peaks[c]:.1f}" for c in COLUMNS)
        value = row.get(key)
        return "-" if value is None else value if isinstance(value, str) else f"{value:.2f} s"

    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row, key) for key in headers) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, rows: list[dict], **meta) -> Path:
    path = Path(path)
    path.write_text(json.dumps({**meta, "columns": list(HEADERS), "rows": rows}, indent=2) + "\n")
    return path
