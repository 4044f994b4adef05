"""Train MagiHuman: `python train.py recipe=base_pretrain [group=option ...] [key=value ...] [--verbose]`.

See conf/train.yaml for the groups and recipes/ for the training methods. Errors in the command
(a missing value, an unknown option, a missing checkpoint) print in a few lines; `--verbose` or
HYDRA_FULL_ERROR=1 shows the traceback. Resume a run with
`python train.py hydra.run.dir=RUN ckpt_path=last [overrides]`: its own overrides are restored.
"""

import sys

import hydra
from omegaconf import DictConfig

from magitrain.cli import command_line


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from magitrain.launch import train

    train(cfg)


if __name__ == "__main__":
    with command_line():
        from magitrain.run_records import with_restored_overrides

        sys.argv = [sys.argv[0], *with_restored_overrides(sys.argv[1:])]
        main()
