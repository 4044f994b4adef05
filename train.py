"""Train MagiHuman: `python train.py recipe=base_pretrain [group=option ...] [key=value ...]`.

See conf/train.yaml for the groups and recipes/ for the training methods.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from magitrain.launch import train

    train(cfg)


if __name__ == "__main__":
    main()
