"""AdamW with its two moment estimates stored in less than float32 (`module.optim.states`).

- `bfloat16`: `AdamWBf16States`, written here: torch's AdamW keeps its states in the parameter
  dtype, and torchao's `_AdamW` rounds bf16 *parameters* stochastically but keeps states in the
  parameter dtype too. The update runs in float32; the moments are written back to bf16 with
  stochastic rounding. Round-to-nearest would freeze `exp_avg_sq`: with beta2 = 0.999 each step
  changes it by 0.1%, less than half a bf16 ulp (0.2%), so it could never decay. The rounding
  noise comes from a generator seeded by (step, parameter index), not from the global RNG: ranks
  of DDP stay identical and a resumed run rounds exactly as an uninterrupted one.
- `8bit`: torchao's `AdamW8bit` (block-wise dynamic 8-bit quantisation as in bitsandbytes,
  maintained by the PyTorch team, DTensor/FSDP2 aware). Its update is `torch.compile`d; on the
  CPU (toy runs and tests) it runs eagerly, since inductor's C++ compile takes ~30 s per shape.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from torchao.optim import AdamW8bit


def _local(t: Tensor) -> Tensor:
    """FSDP2 parameters, gradients and states are DTensors: AdamW is element-wise, use the shard."""
    return t.to_local() if hasattr(t, "to_local") else t


def bf16_stochastic_round(x: Tensor, generator: torch.Generator) -> Tensor:
    """float32 -> bfloat16, rounding away from zero with probability (dropped bits) / 2^16."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


class AdamWBf16States(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with bf16 `exp_avg` and `exp_avg_sq`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # (torch casts every state to its parameter's dtype)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:  # the NonFiniteGuard's skip: weights and states stay
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = int(state["step"])
                param, grad = _local(p), _local(p.grad).float()
                m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                m32 = m.to(torch.float32, copy=True).lerp_(grad, 1 - beta1)
                v32 = v.to(torch.float32, copy=True).lerp_(grad.square(), 1 - beta2)
                generator = torch.Generator(param.device).manual_seed(step * 1_000_003 + index)
                m.copy_(bf16_stochastic_round(m32, generator))
                v.copy_(bf16_stochastic_round(v32, generator))
                denom = (v32 / (1 - beta2**step)).sqrt_().add_(eps)
                update = (m32 / (1 - beta1**step)).div_(denom)
                p32 = param.float().mul_(1 - lr * decay).add_(update, alpha=-lr)
                param.copy_(p32)
        return loss


class TorchaoAdamW8bit(AdamW8bit):
    """torchao's AdamW8bit; eager (not compiled) when the parameters are on the CPU."""

    def step(self, closure=None):
        on_cpu = all(_local(p).device.type == "cpu" for g in self.param_groups for p in g["params"])
        with torch.compiler.set_stance("force_eager") if on_cpu else nullcontext():
            return super().step(closure)


def moment_bytes(states: str, numel: int) -> int:
    """Bytes of the two moments of one parameter tensor of `numel` values (step counter not counted).

    8bit: torchao quantises tensors of >= 4096 values (a multiple of its 256-value block) to one
    byte per value, a float32 scale per block and the 256-entry float32 code map per moment;
    smaller tensors keep float32 moments, as bitsandbytes does. For planning without running the
    step (torchao's 8-bit states cannot be built on fake tensors).
    """
    if states == "float32":
        return 8 * numel
    if states == "bfloat16":
        return 4 * numel
    if states == "8bit":
        if numel >= 4096 and numel % 256 == 0:
            return 2 * (numel + 4 * numel // 256 + 4 * 256)
        return 8 * numel
    raise ValueError(f"optim.states must be float32, bfloat16 or 8bit, got {states!r}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of the optimiser state (8-bit states: codes, scales and the code map)."""

    def nbytes(t) -> int:
        t = _local(t)
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) is not torch.Tensor:
            return sum(nbytes(getattr(t, name)) for name in inner()[0])
        return t.numel() * t.element_size()

    return sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))
