"""A test callback (no test imports, so `train.py` subprocesses can load it as `tests.precision_probe`):
records the dtype of a block linear's output in each network role during the training steps.

rank{r}.json: {role: [dtypes seen]} for the roles (model, critic, teacher) the module has.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lightning.pytorch import Callback

ROLES = ("model", "critic", "teacher")


class BlockLinearDtypes(Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.seen: dict[str, set] = defaultdict(set)

    def on_train_start(self, trainer, pl_module) -> None:
        for role in ROLES:
            network = getattr(pl_module, role, None)
            if network is not None:
                linear = network.block.layers[0].attention.linear_qkv
                linear.register_forward_hook(lambda m, a, out, role=role: self.seen[role].add(str(out.dtype)))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {role: sorted(dtypes) for role, dtypes in self.seen.items()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
