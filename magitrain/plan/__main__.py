"""Will a training config fit? Per-GPU memory from a real step on fake tensors.

    python -m magitrain.plan recipe=NAME [train.py overrides] gpus=N gpu_memory=80GB [--json]

Planner keys besides the train.py overrides: gpus (default 1), gpu_memory (per GPU, default
80GB; GB, GiB and G are all read as GiB, 2**30 bytes, as cards are sold: an "80 GB" H100 holds
79.6 GiB), and the bucket to plan (default: the largest of data.buckets): height, width, seconds,
batch_size. Exit status: 0 when it fits, 1 when it does not, 2 for an error in the command.
"""

from __future__ import annotations

import json
import sys

from magitrain.cli import command_line
from magitrain.errors import UserError

from .planner import GIB, parse_bytes, plan

PLANNER_KEYS = ("gpus", "gpu_memory", "height", "width", "seconds", "batch_size")


FITS, DOES_NOT_FIT = 0, 1  # exit statuses (2: an error in the command, magitrain.cli)


def parse_args(argv: list[str]):
    as_json = "--json" in argv
    keys, overrides = {}, []
    for arg in argv:
        if arg == "--json":
            continue
        key, _, value = arg.partition("=")
        if key in PLANNER_KEYS:
            keys[key] = value
        else:
            overrides.append(arg)
    return keys, overrides, as_json


def bucket_from(keys: dict) -> dict | None:
    if not {"height", "width"} & keys.keys() and "seconds" not in keys and "batch_size" not in keys:
        return None
    from magitrain.data.buckets import frames_for_seconds

    return {
        "height": int(keys.get("height", 256)),
        "width": int(keys.get("width", 448)),
        "frames": frames_for_seconds(float(keys.get("seconds", 5))),
        "batch_size": int(keys.get("batch_size", 1)),
    }


def title(p, gpu_memory: str) -> str:
    """What was planned, with gpu_memory as the user gave it and the GiB it was read as."""
    b = p.bucket
    cp = f", context parallel {p.context_parallel}" if p.context_parallel > 1 else ""
    return (
        f"{p.recipe} / {p.model} / {p.strategy} on {p.gpus} x {gpu_memory} ({p.gpu_memory / GIB:.2f} GiB)"
        f"{cp}: {b['height']}x{b['width']}, {b['frames']} frames, batch {b['batch_size']} per GPU"
    )


def render(p, gpu_memory: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(title(p, gpu_memory), soft_wrap=True, markup=False)  # one line, however wide
    table = Table()
    table.add_column(
        f"per GPU ({p.peak_phase} phase: the peak)" if len(p.activations_by_phase) > 1 else "per GPU"
    )
    table.add_column("GiB", justify="right")
    table.add_column("MiB", justify="right")
    for role, value in p.per_gpu.items():
        table.add_row(role, f"{value / GIB:.2f}", f"{value / 2**20:.1f}")
    table.add_row("[bold]total[/bold]", f"[bold]{p.total / GIB:.2f}[/bold]", f"{p.total / 2**20:.1f}")
    console.print(table)
    if len(p.activations_by_phase) > 1:
        phases = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in p.activations_by_phase.items())
        console.print(f"peak activations by phase: {phases}")
    if p.host:
        console.print(f"host memory per GPU (offloaded): {p.host / GIB:.1f} GiB")
    verdict = "[green]fits[/green]" if p.fits else "[red]does not fit[/red]"
    console.print(f"{verdict}; largest batch per GPU that fits: {p.largest_batch}")
    for s in p.suggestions:
        console.print(f"  - {s}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        return FITS
    keys, overrides, as_json = parse_args(argv)
    if not keys.get("gpus", "1").isdigit() or int(keys.get("gpus", "1")) < 1:
        raise UserError(f"gpus={keys['gpus']!r}: expected a number of GPUs >= 1")
    gpus = int(keys.get("gpus", 1))
    gpu_memory = keys.get("gpu_memory", "80GB")
    p = plan(overrides, gpus, parse_bytes(gpu_memory), bucket_from(keys))
    if as_json:
        print(json.dumps(p.to_json(), indent=2))
    else:
        render(p, gpu_memory)
    return FITS if p.fits else DOES_NOT_FIT


if __name__ == "__main__":
    with command_line():
        sys.exit(main())
