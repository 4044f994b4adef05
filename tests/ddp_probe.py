"""A test callback (no test imports, so `train.py` subprocesses can load it as `tests.ddp_probe`):
records what DDP synchronises of the module on each rank, and the trained state it ends with.

rank{r}.json: "broadcast" (the parameters and buffers DDP broadcasts from rank 0 at its start),
"reduced" (the parameters in its gradient buckets) and "final" (each state_dict tensor's sum
after training, to compare the ranks' replicas).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from lightning.pytorch import Callback


class DDPReach(Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper Lightning built
        named = itertools.chain(ddp.module.named_parameters(), ddp.module.named_buffers())
        self.record["broadcast"] = sorted(n for n, _ in named if n not in ddp.parameters_to_ignore)
        self.record["reduced"] = sorted(
            n
            for n, p in ddp.module.named_parameters()
            if p.requires_grad and n not in ddp.parameters_to_ignore
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["final"] = {k: float(v.double().sum()) for k, v in pl_module.state_dict().items()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
