"""LoRA for the modality-routed linears of MagiHuman, as a PEFT custom layer.

A `ModalityLinear` holds `copies` stacked weights [copies * out, in] (three in the sandwich
layers: video, audio, text; one elsewhere) and applies copy c to the c-th contiguous modality
slice of the sequence. PEFT's `lora.Linear` would put one delta of shape [copies * out, in] on
the whole stacked output, which is wrong for every copy. `ModalityLoraLinear` keeps PEFT's
adapter bookkeeping (adapter names, scaling, dropout, init, enable/disable, merge/unmerge) and
changes what the adapter weights mean:

- `lora_B` [copies * out, r] is stacked like the base weight: copy c's B is its c-th row block;
- `lora_A` is [copies * r, in] (one A per copy) or [r, in] (one A shared by the copies);
- copy c's delta is `scaling * B_c @ A_c`, applied only to copy c's token slice.

The sandwich mode is a property of each adapter (`ModalityLoraConfig.shared_a`), so adapters of
both modes can sit on one layer (`infer.py lora=a,b`). It is registered with PEFT through
`LoraConfig._register_custom_module` (see `adapters.py`).
The frozen base weight may be stored in bf16 or as a torchao float8 tensor: without autocast it
is cast to the activations' dtype at use, so no float32 copy of the base is ever kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import Tensor, nn

from magitrain.model.layers import per_modality


def lora_delta(a: Tensor, b: Tensor, copies: int, scaling: float) -> Tensor:
    """The float32 [copies * out, in] delta of stacked adapter weights A, B (shared or per-copy A)."""
    rank = b.shape[1]
    a_parts = a.chunk(copies) if a.shape[0] == copies * rank else (a,) * copies
    return (
        torch.cat([bc.float() @ ac.float() for ac, bc in zip(a_parts, b.chunk(copies), strict=True)])
        * scaling
    )


def compute_weight(weight: Tensor, x: Tensor) -> Tensor:
    """A frozen weight ready for `F.linear(x, .)`: as stored under autocast, else in x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return weight  # autocast casts it (a torchao float8 weight runs its own matmul)
    if type(weight) not in (Tensor, nn.Parameter):  # torchao float8 storage
        weight = weight.dequantize()
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


@dataclass
class ModalityLoraConfig(PeftLoraConfig):
    """PEFT's LoRA config plus the adapter's sandwich mode: one A shared by the copies, or one per copy."""

    shared_a: bool = False


class ModalityLoraLinear(PeftLoraLinear):
    """PEFT LoRA layer over a ModalityLinear with one B per modality copy and, per adapter, one A
    per copy or one A shared by the copies."""

    @property
    def copies(self) -> int:
        return self.get_base_layer().copies

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # PEFT made A [r, in]; a per-copy adapter gets one A per copy instead
        if not getattr(config, "shared_a", False) and self.copies > 1:
            self.lora_A[adapter_name] = nn.Linear(self.in_features, self.copies * r, bias=False)
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        # adapters (and so their gradients and optimiser states) are float32 whatever the base is
        self.lora_A[adapter_name].to(self.get_base_layer().weight.device, torch.float32)
        self.lora_B[adapter_name].to(self.get_base_layer().weight.device, torch.float32)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> Tensor:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return lora_delta(a, b, self.copies, self.scaling[adapter]).to(self.get_base_layer().weight.dtype)

    def forward(self, x: Tensor, splits, *args, **kwargs) -> Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = []
        if not (self.disable_adapters or self.merged):
            adapters = [name for name in self.active_adapters if name in self.lora_A]
        copies = self.copies
        weights = self.get_base_layer().weight.chunk(copies)

        def one_copy(part: Tensor, c: int) -> Tensor:
            y = F.linear(part, compute_weight(weights[c], part))
            for name in adapters:
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                a_c = a if a.shape[0] == self.r[name] else a.chunk(copies)[c]
                h = self.lora_dropout[name](part).to(a.dtype)
                y = y + F.linear(F.linear(h, a_c), b.chunk(copies)[c]) * self.scaling[name]
            return y

        return per_modality(x, splits, copies, one_copy)
