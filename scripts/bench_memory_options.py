"""Memory options measured on the CPU: AdamW state bytes per parameter (`module.optim.states`),
saved-activation bytes (`module.parallel.saved_activations`), and what the low-precision states
do to a tiny training run's loss curve against float32.

    python scripts/bench_memory_options.py [--steps 100]
    python scripts/bench_memory_options.py --activations 540p 1080p

`--activations`: the peak of activations + temporaries (not gradients) over one forward and
backward of the 15B SR model on fake tensors (one sample, 5 s, the whole 640-token prompt, bf16
autocast without its weight cache as under FSDP2, checkpointing of every block) with float32 and
bf16 saved block inputs. This is the activation peak of a sharded run, where gradients are
reduce-scattered block by block; the planner's activation figure is taken at its unsharded total
peak instead (the end of the backward, when every gradient exists and the saved inputs are gone).
The CPU step builds dense S x S masks (2 x S^2 bytes, counted here) where a GPU builds flex block
masks.

State bytes: a real optimiser step of the tiny model (exact), and the 15B model's figure from its
parameter shapes by the same rule the tests check exactly on the tiny model. Loss curves: the
tiny model trained by `train.py` on synthetic latent shards, the same data and seed per option.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # conftest's compose_train / tiny_run


def state_bytes_tiny(states: str) -> tuple[int, int]:
    from magitrain.model import MagiHumanDiT, get_config
    from magitrain.recipes import OptimConfig
    from magitrain.recipes.low_precision_adamw import state_bytes
    from magitrain.recipes.optim import build_adamw

    torch.manual_seed(0)
    model = MagiHumanDiT(get_config("tiny"))
    opt = build_adamw(model.parameters(), OptimConfig(states=states), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return state_bytes(opt), sum(p.numel() for p in model.parameters())


def losses(shards: Path, out: Path, states: str, steps: int, lr: float) -> list[float]:
    from conftest import compose_train, tiny_run
    from test_train_base import step_losses

    from magitrain.launch import train

    overrides = tiny_run(
        shards,
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint=null",
        f"module.optim.lr={lr}",
        f"module.optim.states={states}",
    )
    train(compose_train(overrides, out))
    found = step_losses(out / "csv" / "metrics.csv")
    return [found[s] for s in sorted(found)]


SR_SHAPES = {"540p": ("magihuman_15b_sr540", (32, 32, 56)), "1080p": ("magihuman_15b_sr1080", (32, 68, 120))}


def activation_peak(preset: str, latent: tuple[int, int, int], saved: str) -> tuple[int, int]:
    """(peak activation + temporary bytes, sequence length) of one fake forward + backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from magitrain.model import MagiHumanDiT, get_config
    from magitrain.parallel import ParallelConfig, parallelize

    class ActivationPeak(MemTracker):
        peak = 0

        def _update_peak_stats(self, peak_state) -> None:  # per op: the running peak only
            for snap in self._curr_mem_snap.values():
                now = sum(v for k, v in snap.items() if getattr(k, "value", k) in ("Activation", "Temp"))
                self.peak = max(self.peak, now)

    config = get_config(preset)
    T, H, W = latent
    with FakeTensorMode():
        model = MagiHumanDiT(config)
        parallelize(model, ParallelConfig(activation_checkpointing=True, saved_activations=saved))
        inputs = (
            torch.randn(1, config.latent_channels, T, H, W),
            torch.randn(1, 4 * (T - 1) + 1, config.audio_in_channels),
            torch.randn(1, 640, config.text_in_channels),
        )
        tracker = ActivationPeak()
        tracker.track_external(model, *inputs)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):  # as FSDP2: no cache
                video, audio = model(*inputs)
            (video.float().square().mean() + audio.float().square().mean()).backward()
    tokens = T * (H // 2) * (W // 2) + 4 * (T - 1) + 1 + 640
    return tracker.peak, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--activations", nargs="*", choices=sorted(SR_SHAPES), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.activations:
        print("| SR stage | tokens | saved block inputs | activation peak | dense masks (CPU only) |")
        print("|---|---|---|---|---|")
        for name in args.activations:
            preset, latent = SR_SHAPES[name]
            for saved in ("float32", "bfloat16"):
                peak, tokens = activation_peak(preset, latent, saved)
                masks = 2 * tokens**2
                print(f"| {name} | {tokens} | {saved} | {peak / 2**30:.1f} GiB | {masks / 2**30:.1f} GiB |")
        return
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.model import MagiHumanDiT, get_config
    from magitrain.recipes.low_precision_adamw import moment_bytes

    with torch.device("meta"):
        big = [p.numel() for p in MagiHumanDiT(get_config("magihuman_15b")).parameters()]
    print("| states | tiny: bytes/param (real step, with step counters) | 15B: bytes/param | 15B total |")
    print("|---|---|---|---|")
    for states in ("float32", "bfloat16", "8bit"):
        nbytes, n = state_bytes_tiny(states)
        b15 = sum(moment_bytes(states, n) for n in big)
        print(f"| {states} | {nbytes / n:.4f} | {b15 / sum(big):.4f} | {b15 / 2**30:.1f} GiB |")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_latent_dataset(
            tmp / "shards", num_samples=16, per_shard=4, latent_shapes=((3, 4, 6),), text_dim=64
        )
        options = ("float32", "bfloat16", "8bit")
        curves = {s: losses(tmp / "shards", tmp / s, s, args.steps, args.lr) for s in options}
    ref = torch.tensor(curves["float32"])
    print(f"\nloss curves, tiny model, {args.steps} steps, lr {args.lr:g} (first -> last, float32: "
          f"{ref[0]:.4f} -> {ref[-1]:.4f})")  # fmt: skip
    print("| states | last loss | mean of last 10 | max abs diff vs float32 | mean relative diff |")
    print("|---|---|---|---|---|")
    for states, curve in curves.items():
        got = torch.tensor(curve)
        diff = (got - ref).abs()
        rel = (diff / ref.abs()).mean()
        print(f"| {states} | {got[-1]:.4f} | {got[-10:].mean():.4f} | {diff.max():.2e} | {rel:.2e} |")


if __name__ == "__main__":
    main()
