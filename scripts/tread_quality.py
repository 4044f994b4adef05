"""TREAD quality per FLOP: the base recipe's flow-matching loss on a learnable toy, with and without routing.

    python scripts/tread_quality.py [--steps N] [--rate R] [--seeds 0,1] [--json out.json]

The toy: K classes, each a video-latent prototype [48, 3, 8, 8] (48 video tokens) and a paired
audio prototype [9, 64] (magitrain.data.synthetic: prototype + 0.1 noise), named by a random text
embedding of 8 tokens. A 6-layer, 128-wide MagiHuman (sandwich layers 0 and 5, the released span
scaled to 6 layers: layers 1..4 routed) trains with the recipe's own `FlowMatchingModule.flow_loss`
(its noise, noise levels and TREAD routes, drawn per sample from the keys) and AdamW, without and
with `module.tread.rate=R` from the same initial weights and the same batches. Every `--eval-every`
steps the held-out loss (fixed samples, noise and levels; no routing, as sampling runs) is recorded
beside the FLOPs computed so far (magitrain.model.flops: the routed layers count the kept tokens).
The figure of merit: the held-out loss at equal computed FLOPs (the unrouted curve interpolated at
the routed run's FLOPs). One torch thread; a few minutes on a CPU. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from magitrain.data.synthetic import class_sample
from magitrain.flow.tread import TreadConfig
from magitrain.model import SequenceLayout, tiny
from magitrain.model.flops import training_flops
from magitrain.recipes import FlowMatchingConfig, FlowMatchingModule

LATENT, TEXT, SPREAD = (3, 8, 8), 8, 0.1
CONFIG = dict(num_layers=6, hidden_size=128, head_dim=32, num_heads_q=4, num_heads_kv=2, swiglu_hidden=340,
              gelu_hidden=512, sandwich_layers=(0, 5), gelu7_layers=(0,))  # fmt: skip


def make_toy(classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t, h, w = LATENT
    return {
        "video": torch.randn(classes, 48, t, h, w, generator=g),
        "audio": torch.randn(classes, 4 * (t - 1) + 1, 64, generator=g),
        "text": torch.randn(classes, TEXT, 64, generator=g),
    }


def make_batch(toy: dict, labels: list[int], keys: list[str], gen: torch.Generator) -> dict:
    protos = {"video": toy["video"], "audio": toy["audio"]}
    samples = [class_sample(protos, c, SPREAD, gen) for c in labels]
    return {
        "video_latent": torch.stack([s["video"] for s in samples]),
        "audio_latent": torch.stack([s["audio"] for s in samples]),
        "text_emb": toy["text"][labels],
        "text_len": torch.full((len(labels),), TEXT),
        "key": keys,
    }


def train(
    toy: dict, rate: float, steps: int, batch: int, eval_every: int, seed: int, lr: float
) -> list[dict]:
    """Held-out loss and FLOPs so far every `eval_every` steps of one run."""
    torch.manual_seed(seed)  # the same initial weights with and without routing
    flow = FlowMatchingConfig(p_drop_text=0.0, p_image=0.0)
    module = FlowMatchingModule(tiny(**CONFIG), flow=flow, tread=TreadConfig(rate=rate), seed=seed)
    module.configure_model()
    judge = FlowMatchingModule(tiny(**CONFIG), flow=flow, seed=seed)  # unrouted, as sampling runs
    judge.model = module.model
    classes = toy["video"].shape[0]
    n = 4 * classes
    labels, keys = [c % classes for c in range(n)], [f"val/{i}" for i in range(n)]
    held_out = make_batch(toy, labels, keys, torch.Generator().manual_seed(10_000 + seed))
    data_gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(module.model.parameters(), lr=lr, weight_decay=0.0)
    layout = SequenceLayout(
        batch, LATENT[0], LATENT[1] // 2, LATENT[2] // 2, held_out["audio_latent"].shape[1], TEXT
    )
    curve, flops, start = [], 0.0, time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                loss = float(judge.flow_loss(held_out)["loss"])
            curve.append({"step": step, "tflop": flops / 1e12, "held_out_loss": loss,
                          "seconds": time.perf_counter() - start})  # fmt: skip
        if step == steps:
            break
        labels = torch.randint(classes, (batch,), generator=data_gen).tolist()
        out = module.flow_loss(make_batch(toy, labels, [f"{step}/{i}" for i in range(batch)], data_gen))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        flops += float(training_flops(module.model_config, layout, module.last_route))
    return curve


def at_flops(curve: list[dict], tflop: float) -> float:
    """The held-out loss of a curve at `tflop` computed TFLOPs (linear between its points)."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a["tflop"] <= tflop <= b["tflop"]:
            f = (tflop - a["tflop"]) / max(b["tflop"] - a["tflop"], 1e-30)
            return a["held_out_loss"] + f * (b["held_out_loss"] - a["held_out_loss"])
    raise ValueError(f"{tflop} TFLOP lies outside the curve")


def compare(off: list[dict], routed: list[dict]) -> dict:
    """Losses at the routed run's end: the unrouted run at the same computed FLOPs and at the same step."""
    end = routed[-1]
    return {
        "routed_final": end["held_out_loss"],
        "unrouted_at_equal_flops": at_flops(off, end["tflop"]),
        "unrouted_at_equal_steps": off[-1]["held_out_loss"],
        "flops_ratio": end["tflop"] / off[-1]["tflop"],
        "seconds_ratio": end["seconds"] / off[-1]["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        toy = make_toy(args.classes, seed)
        off = train(toy, 0.0, args.steps, args.batch, args.eval_every, seed, args.lr)
        routed = train(toy, args.rate, args.steps, args.batch, args.eval_every, seed, args.lr)
        results[seed] = {"off": off, "routed": routed, "compare": compare(off, routed)}
        print(json.dumps({"seed": seed, **results[seed]["compare"]}), flush=True)
        if args.json:  # after every seed: a run cut short keeps what finished
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)
    better = all(
        r["compare"]["routed_final"] <= r["compare"]["unrouted_at_equal_flops"] for r in results.values()
    )
    return 0 if better else 1


if __name__ == "__main__":
    raise SystemExit(main())
