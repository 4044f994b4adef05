"""Export a training checkpoint of any recipe: the released layout, or a LoRA run's adapter file.

    python -m magitrain.export CKPT OUT [--ema] [--dtype bf16] [--max-shard-size 5GB]
    python -m magitrain.export LORA_CKPT OUT.safetensors [--ema]       # adapter file
    python -m magitrain.export LORA_CKPT OUT --merge [--base DIR] [--ema] [--dtype bf16]

CKPT is a Lightning checkpoint: one file (single device, DDP), a distributed-checkpoint directory
(FSDP2) or a DeepSpeed directory. OUT loads with `load_official` and the released inference code.
A LoRA run's checkpoint (recipe=lora_*) exports its adapter file, or with --merge the base (the
run's init, or --base) with the adapter merged in, in the released layout (magitrain/lora/export.py).
The command sits above the recipes so that checkpoint I/O (magitrain/checkpoint) imports none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from magitrain.checkpoint.export import DTYPES, export_network, read_training_checkpoint
from magitrain.errors import UserError


def export(
    ckpt: str | Path,
    out: str | Path,
    ema: bool = False,
    dtype: str = "keep",
    max_shard_size: str = "5GB",
    merge: bool = False,
    base: str | None = None,
) -> Path:
    state, hparams = read_training_checkpoint(ckpt)
    if "lora" in hparams:
        from magitrain.lora.export import export_lora  # (the LoRA recipes: Lightning, PEFT)

        return export_lora(state, hparams, out, str(ckpt), ema, merge, base, DTYPES[dtype], max_shard_size)
    if merge or base:
        raise UserError(f"--merge and --base apply to LoRA checkpoints; {ckpt} is not one")
    return export_network(state, hparams, out, str(ckpt), ema, DTYPES[dtype], max_shard_size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="Lightning checkpoint file or directory")
    p.add_argument("out", help="output directory (released layout)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="keep", help="of the block linears; the rest stays float32"
    )
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--merge", action="store_true", help="LoRA: merge the adapter into the base weights")
    p.add_argument("--base", help="LoRA --merge: the base checkpoint (default: the run's init)")
    args = p.parse_args(argv)
    out = export(args.ckpt, args.out, args.ema, args.dtype, args.max_shard_size, args.merge, args.base)
    print(f"exported {'EMA' if args.ema else 'model'} weights of {args.ckpt} to {out}")


if __name__ == "__main__":
    from magitrain.cli import command_line

    with command_line():
        main()
