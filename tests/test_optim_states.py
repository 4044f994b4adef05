"""`module.optim.states`: AdamW moments in float32, bfloat16 (stochastic rounding) or 8 bits (torchao).

Exact state bytes per parameter, bf16 moments that still decay (round-to-nearest would freeze
them), training that tracks float32, bit-exact resume of a SIGKILLed run, non-finite steps that
leave the low-precision states alone, and DDP / FSDP2 with two gloo processes.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_train, straight_and_resumed, tiny_run
from test_reliability_nonfinite import BAD, check_probe, probe
from test_train_base import step_losses
from test_train_distributed import assert_runs_match, four_samples, run_train  # noqa: F401 (fixture)

from magitrain.launch import train
from magitrain.model import MagiHumanDiT, get_config
from magitrain.recipes import OptimConfig
from magitrain.recipes.low_precision_adamw import AdamWBf16States, moment_bytes, state_bytes
from magitrain.recipes.optim import build_adamw

CPU = torch.device("cpu")


def _one_step(states: str) -> tuple[MagiHumanDiT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MagiHumanDiT(get_config("tiny"))
    opt = build_adamw(model.parameters(), OptimConfig(states=states), CPU)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


@pytest.mark.parametrize("states", ["float32", "bfloat16", "8bit"])
def test_state_bytes_per_parameter_are_exact(states):
    model, opt = _one_step(states)
    tensors = list(model.parameters())
    steps = 4 * len(tensors)  # one float32 step count per tensor
    assert state_bytes(opt) == sum(moment_bytes(states, p.numel()) for p in tensors) + steps
    n = sum(p.numel() for p in tensors)
    per_param = {"float32": 8, "bfloat16": 4, "8bit": 2.2}[states]  # (8bit: small tensors stay fp32)
    assert state_bytes(opt) - steps <= per_param * n
    if states == "bfloat16":
        assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in opt.state.values())
    if states == "8bit":  # what is quantised: most of it
        assert sum(p.numel() for p in tensors if moment_bytes("8bit", p.numel()) < 8 * p.numel()) > 0.9 * n


def test_bf16_moments_still_decay():
    """With a zero gradient exp_avg_sq must shrink by beta2 per step on average. Round-to-nearest
    bf16 freezes it (0.1% per step is under half a bf16 ulp); stochastic rounding does not."""
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamWBf16States([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.ones(4096)
    opt.step()
    v0 = opt.state[p]["exp_avg_sq"].float().mean()
    p.grad = torch.zeros(4096)
    for _ in range(200):
        opt.step()
    v = opt.state[p]["exp_avg_sq"].float().mean()
    assert float(v / v0) == pytest.approx(0.999**200, rel=0.01)


@pytest.mark.parametrize("states", ["bfloat16", "8bit"])
def test_low_precision_states_track_float32_on_a_toy_regression(states):
    def losses(states: str) -> list[float]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
        opt = build_adamw(net.parameters(), OptimConfig(lr=1e-2, states=states), CPU)
        x, y, out = torch.randn(32, 64), torch.randn(32, 64), []
        for _ in range(50):
            loss = (net(x) - y).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    want, got = losses("float32"), losses(states)
    assert got[-1] < 0.01 * got[0]  # it trains
    assert got[-1] == pytest.approx(want[-1], rel=0.05)  # and lands where float32 does


def test_unknown_states_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="optim.states"):
        OptimConfig(states="fp16")


@pytest.mark.slow
@pytest.mark.parametrize("states", ["bfloat16", "8bit"])
def test_a_killed_run_with_low_precision_states_resumes_exactly(states, latent_shards, tmp_path):
    overrides = tiny_run(
        latent_shards,
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"module.optim.states={states}",
    )
    straight, resumed, _ = straight_and_resumed(overrides, tmp_path)
    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert type(straight.optimizers[0]) is type(resumed.optimizers[0])
    for a, b in zip(straight.optimizers[0].state.values(), resumed.optimizers[0].state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key].dequantize() if states == "8bit" else a[key],
                               b[key].dequantize() if states == "8bit" else b[key])  # fmt: skip
    want_losses = step_losses(tmp_path / "straight" / "csv" / "metrics.csv")
    got_losses = step_losses(tmp_path / "killed" / "csv_resumed" / "metrics.csv")
    assert got_losses and all(got_losses[s] == want_losses[s] for s in got_losses)


@pytest.mark.parametrize("states", ["bfloat16", "8bit"])
def test_a_non_finite_step_leaves_low_precision_states_alone(states, latent_shards, tmp_path):
    overrides = tiny_run(
        latent_shards, "trainer.max_steps=4", f"module.optim.states={states}", *probe(tmp_path / "probe")
    )
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 4
    record = json.loads((tmp_path / "probe" / "rank0.json").read_text())
    check_probe(record)
    assert any(k.endswith("exp_avg_sq") for k in record["steps"][str(BAD + 2)]["changed"])


# FSDP2 also with checkpointed blocks whose inputs are saved in bf16 (module.parallel.saved_activations)
BF16_SAVED = ("module.parallel.activation_checkpointing=true", "module.parallel.saved_activations=bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "states", "more"), [("ddp", "8bit", ()), ("fsdp2", "bfloat16", BF16_SAVED)]
)
def test_two_gloo_ranks_with_low_precision_states_match_one_process(
    strategy,
    states,
    more,
    four_samples,  # noqa: F811
    tmp_path,
):
    single, dist = tmp_path / "single", tmp_path / "dist"
    extra = (f"module.optim.states={states}", "module.parallel.param_dtype=float32", *more)
    run_train(single, four_samples, devices=1, strategy="auto", batch_size=4, extra=extra)
    run_train(dist, four_samples, devices=2, strategy=strategy, batch_size=2, extra=extra)
    assert_runs_match(single, dist)
