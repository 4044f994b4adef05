"""LoRA recipes: any MagiHuman recipe with a frozen low-precision base and trainable adapters.

`LoraMixin` goes before a recipe class (`class LoraFlowMatchingModule(LoraMixin, FlowMatchingModule)`)
and changes only what LoRA changes: how `model` is built (frozen base + PEFT adapters), what the
EMA covers (the adapters: a second, inactive adapter named "ema"), and what a Lightning checkpoint
holds (the adapters and their EMA, plus the optimiser, data position and RNG that Lightning and
the callbacks save; not the frozen base, which is rebuilt from `init` on resume).
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from magitrain.errors import UserError
from magitrain.parallel import parallelize
from magitrain.recipes.flow_matching import FlowMatchingModule
from magitrain.recipes.sr import SRFineTuneModule

from .adapters import (
    EMA,
    TRAINED,
    add_adapter,
    build_frozen_base,
    is_adapter_key,
    load_adapter,
    read_checked_adapter,
    set_active,
)
from .config import LoraConfig


class LoraMixin:
    def __init__(self, *args, lora: LoraConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_config = lora or LoraConfig()
        self.hparams["lora"] = asdict(self.lora_config)
        self.lora_targets: list[str] = []
        # The checkpoint holds the adapters only: `on_load_checkpoint` checks its keys exactly instead.
        self.strict_loading = False

    # ----- networks -------------------------------------------------------------------------
    def build_lora_networks(self) -> None:
        """`model`: the frozen base (from `init`) with the trained adapter (and its EMA shadow) injected."""
        self.check_lora_strategy()
        network = self.frozen_base()
        self.lora_targets = self.adapt(network, self.lora_config.init, ema=self._ema_requested)
        self.model = parallelize(network, self.parallel_config, None, trainable=True)

    def check_lora_strategy(self) -> None:
        """One device or DDP only: FSDP2 and DeepSpeed (any ZeRO stage) would shard or wrap the
        frozen base and the small adapter optimiser in ways these recipes do not handle."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy if self._trainer is not None else None
        what = None
        if isinstance(strategy, DeepSpeedStrategy):
            what = f"DeepSpeed (ZeRO stage {strategy.config['zero_optimization']['stage']})"
        elif self.device_mesh is not None or isinstance(strategy, ModelParallelStrategy):
            what = "FSDP2 sharding"
        if what:
            raise UserError(
                "LoRA recipes run on one device or with strategy=ddp (the bf16 base is 28.5 GB, "
                f"the fp8 base 15 GB); {what} is not supported for LoRA: use strategy=ddp"
            )

    def frozen_base(self):
        return build_frozen_base(self.model_config, self.init_path, self.lora_config.base_dtype)

    def adapt(self, network, init: str | None = None, ema: bool = False) -> list[str]:
        """Inject the trained adapter into `network` (continued from the adapter file `init`), with
        `ema` also its EMA shadow; the trained adapter is the active one. Returns the adapted linears."""
        cfg = self.lora_config
        targets = add_adapter(network, cfg, TRAINED)
        if init:
            tensors, file_cfg = read_checked_adapter(init, network, "lora.init")
            for f, mine in (
                ("rank", cfg.rank),
                ("alpha", cfg.alpha),
                ("sandwich", cfg.sandwich),
                ("targets", targets),
            ):
                if getattr(file_cfg, f) != mine:
                    raise UserError(
                        f"lora.init={init} was trained with {f}={getattr(file_cfg, f)!r}, "
                        f"this run has {mine!r}"
                    )
            load_adapter(network, tensors, TRAINED, f"lora.init={init}")
        if ema:
            add_adapter(network, cfg, EMA)
        set_active(network, TRAINED)
        return targets

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once
            return
        self.build_lora_networks()
        self.start_ema()
        self.keep_frozen_out_of_ddp()

    def start_ema(self) -> None:
        """The EMA shadow starts as a copy of the trained adapter."""
        if self._ema_requested:
            with torch.no_grad():
                for shadow, param in zip(*self.ema_parameters(), strict=True):
                    shadow.copy_(param)

    def keep_frozen_out_of_ddp(self) -> None:
        """Name every tensor but the adapters for DDP to ignore (Lightning wraps this module after
        `configure_model`): DDP would broadcast them all from rank 0 at start, and torchao's float8
        weights cannot be flattened for that; every rank builds the same frozen base anyway (from
        `init`, or from the same seed)."""
        named = itertools.chain(
            self.named_parameters(remove_duplicate=False), self.named_buffers(remove_duplicate=False)
        )
        frozen = sorted({n for n, _ in named if not is_adapter_key(n)})
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)

    def ema_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        """(shadow, live) parameters the EMA callback averages: the trained adapter's only."""
        named = dict(self.model.named_parameters())
        live = [k for k in named if is_adapter_key(k, TRAINED)]
        shadow = [k.replace(f".{TRAINED}.", f".{EMA}.") for k in live]
        return [named[k] for k in shadow], [named[k] for k in live]

    def base_autocast(self):
        """A bf16 or fp8 base computes its block matmuls in bf16 (as released), whatever trainer.precision."""
        if self.lora_config.base_dtype == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ----- checkpoints ----------------------------------------------------------------------
    def adapter_networks(self) -> dict[str, torch.nn.Module]:
        """The networks carrying adapters, by attribute name (LoRA-DMD adds the critic)."""
        return {"model": self.model}

    def adapter_keys(self) -> set[str]:
        return {
            f"{root}.{k}"
            for root, network in self.adapter_networks().items()
            for k, _ in network.named_parameters()
            if is_adapter_key(k)
        }

    def base_fingerprint(self) -> float:
        """A checksum of the frozen base's float32 embedders and heads: resuming on another base fails."""
        m = self.model
        parts = (m.adapter.video_embedder.weight, m.final_linear_video.weight, m.final_linear_audio.weight)
        return float(sum(p.detach().double().sum() for p in parts))

    def state_dict(self, *args, **kwargs) -> dict:
        """The adapters only: Lightning saves this, and callbacks (NonFiniteGuard) scan it before
        `on_save_checkpoint` runs, so the frozen base (15B, maybe float8) never enters a checkpoint."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = {prefix + k for k in self.adapter_keys()}
        for k in [k for k in state if k not in keep]:
            del state[k]
        return state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lora_base"] = {"init": self.init_path, "fingerprint": self.base_fingerprint()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("lora_base", {})
        if saved and saved["fingerprint"] != self.base_fingerprint():
            raise UserError(
                f"the checkpoint's adapters were trained on another base (init={saved['init']}); "
                f"this run's base is init={self.init_path}: resume with the same init"
            )
        got, want = set(checkpoint["state_dict"]), self.adapter_keys()
        if got != want:
            missing, unexpected = sorted(want - got), sorted(got - want)
            raise UserError(
                "the checkpoint's adapters do not match this run's lora config: "
                f"{len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        super().on_load_checkpoint(checkpoint)


class LoraFlowMatchingModule(LoraMixin, FlowMatchingModule):
    """Flow matching (recipe=lora_base) with adapters on a frozen base."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        with self.base_autocast():
            return super().training_step(batch, batch_idx)


class LoraSRFineTuneModule(LoraMixin, SRFineTuneModule):
    """SR fine-tuning (recipe=lora_sr_540p / lora_sr_1080p) with adapters on a frozen SR base."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        with self.base_autocast():
            return super().training_step(batch, batch_idx)
