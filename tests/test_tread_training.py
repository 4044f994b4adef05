"""TREAD in the recipes: a real Lightning run routes, logs the routed share and resumes exactly;
routing leaves every other draw of a step as it was; the planner plans the routed step; DMD-2
routes only its training forwards with grad (student, critic), never the teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, tiny_run
from lightning.pytorch import Callback
from test_train_base import read_metrics

from magitrain.launch import train

TREAD = ("module.tread.rate=0.5",)


def test_a_routed_run_logs_the_routed_share_and_resumes_exactly(latent_shards, tmp_path):
    """4 steps straight == 2 steps, then a resume from the step-2 checkpoint (routing on); the
    routed share is the set-aside video tokens over all real tokens."""
    common = (*TREAD, "data.shuffle=false", "callbacks.model_checkpoint.every_n_train_steps=2",
              "trainer.log_every_n_steps=1", "module.optim.total_steps=4")  # one schedule  # fmt: skip
    straight = train(compose_train(tiny_run(latent_shards, *common, "trainer.max_steps=4"), tmp_path / "a"))
    train(compose_train(tiny_run(latent_shards, *common, "trainer.max_steps=2"), tmp_path / "b"))
    step2 = tmp_path / "b" / "checkpoints" / "step00000002.ckpt"
    resumed = train(
        compose_train(
            tiny_run(latent_shards, *common, "trainer.max_steps=4", f"ckpt_path={step2}"), tmp_path / "b"
        )
    )
    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k

    rows = [r for r in read_metrics(tmp_path / "a" / "csv" / "metrics.csv") if r.get("perf/routed_fraction")]
    assert len(rows) == 4
    for r in rows:  # latent 3 x 4 x 6: 18 video tokens a sample, 9 of them set aside
        per_sample = float(r["perf/tokens_per_s"]) / float(r["perf/samples_per_s"])
        assert float(r["perf/routed_fraction"]) == pytest.approx(9 / per_sample)


def test_routing_draws_from_its_own_stream_and_changes_only_the_forward():
    from magitrain.flow import TreadConfig
    from magitrain.model import tiny
    from magitrain.recipes import FlowMatchingModule

    batch = {
        "video_latent": torch.randn(2, 48, 3, 4, 6),
        "audio_latent": torch.randn(2, 5, 64),
        "text_emb": torch.randn(2, 7, 64),
        "text_len": torch.tensor([7, 4]),
        "key": ["a", "b"],
    }
    kinds = ({}, {"tread": TreadConfig(rate=0.5)}, {"tread": TreadConfig(rate=0.0)})
    off, on, zero = (FlowMatchingModule(tiny(), **kw) for kw in kinds)
    for m in (off, on, zero):
        m.configure_model()
        m.model.load_state_dict(off.model.state_dict())
    draws_off, draws_on = off._draw(batch), on._draw(batch)
    for k in draws_off:
        assert torch.equal(draws_off[k], draws_on[k]), k
    assert torch.equal(zero.flow_loss(batch)["loss"], off.flow_loss(batch)["loss"])
    assert not torch.equal(on.flow_loss(batch)["loss"], off.flow_loss(batch)["loss"])
    route = on.last_route
    assert route.video.shape == (2, 9) and (route.start, route.end) == (1, 2)
    assert torch.equal(on.token_route(batch).video, route.video)  # a function of (seed, step, key)


def test_the_planner_runs_the_routed_step_and_plans_its_smaller_activations():
    """The planner measures the recipe's own step, so a routed run's plan holds the routed
    activations: fewer than without routing, and what the real routed step holds (1080p-SR layout)."""
    import hydra

    from magitrain.plan import measure_step
    from magitrain.plan.planner import compose

    def measure(rate: float, fake: bool) -> int:
        cfg = compose(["recipe=sr_finetune_1080p", "model=tiny_sr1080", f"module.tread.rate={rate}"])
        module = hydra.utils.instantiate(cfg.module)
        memory = measure_step(module, 2, (8, 16, 24), 16, str(cfg.trainer.precision), fake=fake)
        return memory.activations["step"]

    routed = measure(0.5, fake=True)
    assert routed < 0.9 * measure(0.0, fake=True)  # measured: 52.9 MB vs 65.0 MB
    assert routed == measure(0.5, fake=False)  # (fake and real agree without routing: test_plan*.py)


class RouteSpy(Callback):
    """Which DMD-2 network forwards got a route: (network, grad enabled, routed) per call."""

    calls: list = []

    def on_train_start(self, trainer, pl_module):
        RouteSpy.calls = []
        for name in ("model", "critic", "teacher"):
            network = getattr(pl_module, name)

            def spy(module, args, kwargs, name=name):
                RouteSpy.calls.append((name, torch.is_grad_enabled(), kwargs.get("route") is not None))

            network.register_forward_pre_hook(spy, with_kwargs=True)


def test_dmd2_routes_the_student_and_critic_training_forwards_never_the_teacher(latent_shards, tmp_path):
    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, tiny

    teacher = save_official(MagiHumanDiT(tiny()), tmp_path / "teacher")
    spy = "+callbacks.spy._target_=test_tread_training.RouteSpy"
    dmd = ("recipe=dmd2_distill", f"teacher={teacher}", "module.dmd.ttur=1", "trainer.max_steps=1", spy)
    overrides = tiny_run(latent_shards, *TREAD, *dmd)
    train(compose_train(overrides, tmp_path / "run"))
    calls = set(RouteSpy.calls)
    assert ("teacher", True, True) not in calls and ("teacher", False, True) not in calls
    assert ("model", True, True) in calls and ("model", False, True) not in calls  # the exit step only
    assert ("critic", True, True) in calls  # its own loss
    assert ("critic", False, False) in calls  # its score inside the generator loss: unrouted


@pytest.fixture(scope="module")
def pairs_and_init(tmp_path_factory):
    """LR/HR latent pairs (SR x2; the flow-matching recipes read their HR side) and a tiny init."""
    from magitrain.checkpoint import save_official
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.model import MagiHumanDiT, tiny

    out = tmp_path_factory.mktemp("tread_pairs")
    make_latent_dataset(out, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2)
    torch.manual_seed(0)
    return out, save_official(MagiHumanDiT(tiny()), out / "init")


# the recipes whose routed training no other test runs (base, DMD-2 and SR distillation: above and
# tests/test_sr_dmd.py): LoRA's adapters, LoRA-DMD's and SR fine-tuning's forwards
@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("lora_base", ("module.lora.rank=4",)),
        ("lora_dmd2", ("module.lora.rank=4", "module.dmd.ttur=1")),
        ("sr_finetune_540p", ()),
    ],
    ids=["lora_base", "lora_dmd2", "sr_finetune_540p"],
)
def test_every_recipe_trains_with_routing(recipe, extra, pairs_and_init, tmp_path, monkeypatch):
    """Two steps of `module.tread.rate=0.5`: each forward with grad gets the route of its step, with
    half of the 18 video tokens of each sample kept; the forwards without grad (DMD-2's teacher and
    rollouts) none; the losses are finite."""
    from magitrain.model import MagiHumanDiT

    shards, init = pairs_and_init
    routes = []
    forward = MagiHumanDiT.forward

    def spy(self, *args, **kwargs):
        routes.append((torch.is_grad_enabled(), kwargs.get("route")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MagiHumanDiT, "forward", spy)
    weights = f"teacher={init}" if "dmd" in recipe else f"init={init}"
    overrides = tiny_run(shards, f"recipe={recipe}", weights, *TREAD, *extra, "trainer.max_steps=2")
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 2
    with_grad = [r for grad, r in routes if grad]
    assert with_grad and all(r is not None and tuple(r.video.shape) == (2, 9) for r in with_grad)
    assert all(r is None for grad, r in routes if not grad)
    losses = [float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
