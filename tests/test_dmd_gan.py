"""DMD-2's optional GAN term (module.dmd.gan): the loss functions by hand, the hooks under
activation checkpointing, a discriminator that learns, and the recipe with the term on (real
trainer, exact resume)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_train, straight_and_resumed, tiny_run
from hydra.utils import instantiate

from magitrain.checkpoint import save_official
from magitrain.flow import gan
from magitrain.flow.training import interpolate
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, tiny
from magitrain.parallel import ParallelConfig, parallelize
from magitrain.recipes.dmd_gan import DMDGAN, GANConfig


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_the_gan_losses_equal_a_hand_computation():
    fake = torch.tensor([0.0, 2.0, -1.5])
    want = (math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1.5))) / 3
    assert gan.generator_gan_loss(fake).item() == pytest.approx(want, rel=1e-6)
    real = torch.tensor([1.0, -0.5])
    fake = torch.tensor([-1.0, 3.0])
    want = (softplus(-1.0) + softplus(0.5)) / 2 + (softplus(-1.0) + softplus(3.0)) / 2
    assert gan.discriminator_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    # a perfect discriminator costs ~0, a fooled one a lot
    assert gan.discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0])).item() < 1e-8
    assert gan.discriminator_loss(torch.tensor([-5.0]), torch.tensor([5.0])).item() > 10


def test_the_approximate_r1_by_hand_and_against_the_true_r1_of_a_linear_discriminator():
    real, moved = torch.tensor([1.0, 2.0]), torch.tensor([1.01, 1.98])
    assert gan.approximate_r1(real, moved, sigma=0.1).item() == pytest.approx(
        (1e-4 + 4e-4) / 2 / 0.01, rel=1e-5
    )
    # D(x) = w . x has |grad D|^2 = |w|^2; the finite difference estimates it
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, generator=g), torch.randn(20000, 16, generator=g)
    sigma = 0.05
    n = torch.randn(x.shape, generator=g)
    estimate = gan.approximate_r1(x @ w, (x + sigma * n) @ w, sigma)
    assert estimate.item() == pytest.approx(w.pow(2).sum().item(), rel=0.05)
    with pytest.raises(ValueError, match="sigma > 0"):
        gan.approximate_r1(real, moved, sigma=0.0)


def test_gan_config_checks_layers_and_values():
    assert GANConfig().layer_indices(4) == [2]  # the middle layer by default
    assert GANConfig(layers=[-1, 0, 3]).layer_indices(4) == [0, 3]
    with pytest.raises(ValueError, match="not a layer of a 4-layer critic"):
        GANConfig(layers=[4]).layer_indices(4)
    with pytest.raises(ValueError, match="r1_sigma > 0"):
        GANConfig(r1_sigma=0.0)


def _velocity(network):
    text = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))

    def velocity(x, s):
        v, a = network(x["video"], x["audio"], text)
        return {"video": v, "audio": a}

    return velocity


def test_the_hooks_give_the_same_logits_and_gradients_under_activation_checkpointing():
    torch.manual_seed(0)
    plain = MagiHumanDiT(tiny())
    checkpointed = MagiHumanDiT(tiny())
    checkpointed.load_state_dict(plain.state_dict())
    parallelize(plain, ParallelConfig(activation_checkpointing=False))
    parallelize(checkpointed, ParallelConfig(activation_checkpointing=True))
    g = torch.Generator().manual_seed(1)
    x = {"video": torch.randn(2, 48, 3, 4, 6, generator=g), "audio": torch.randn(2, 9, 64, generator=g)}
    s = torch.tensor([0.3, 0.8])
    results = []
    for network in (plain, checkpointed):
        term = DMDGAN(GANConfig(enabled=True, layers=[0, -1]), network, seed=7)
        logits = term.critic_logits(_velocity(network), x, s)
        logits.pow(2).sum().backward()
        layer0 = network.block.layers[0].attention.linear_qkv.weight.grad.clone()
        results.append((logits.detach(), layer0, term.head.proj[0].weight.grad.clone()))
        assert term.tap._features is None  # capture closed: the recomputation stored nothing
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    assert results[0][1].abs().sum() > 0  # the head's loss reaches the critic's tapped layers


def test_the_discriminator_learns_to_tell_real_from_clearly_different_fake():
    torch.manual_seed(0)
    critic = MagiHumanDiT(tiny())
    term = DMDGAN(GANConfig(enabled=True, r1_weight=0.1), critic, seed=0)
    velocity = _velocity(critic)
    g = torch.Generator().manual_seed(2)

    def draw(scale, shift):
        return {
            "video": shift + scale * torch.randn(2, 48, 3, 4, 6, generator=g),
            "audio": shift + scale * torch.randn(2, 9, 64, generator=g),
        }

    opt = torch.optim.AdamW([*critic.parameters(), *term.parameters()], lr=1e-3, betas=(0.0, 0.999))
    first = None
    for _ in range(30):
        real, fake = draw(0.5, 1.0), draw(1.0, -1.0)  # two clearly different distributions
        s = torch.rand(2, generator=g) * 0.4 + 0.1
        eps = draw(1.0, 0.0)
        x_t = {m: interpolate(v, eps[m], s) for m, v in fake.items()}
        d_fake = term.critic_logits(velocity, x_t, s)
        loss, logs = term.discriminator_loss(
            velocity, d_fake, real, s=s, eps=eps, perturbation=draw(1.0, 0.0)
        )
        first = first if first is not None else logs["d_loss"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(2 * math.log(2), abs=0.1)  # an untrained head: chance
    assert logs["d_loss"].item() < 0.3 and logs["d_real"] > 1 and logs["d_fake"] < -1, logs
    assert torch.isfinite(logs["r1"])


# ----- the recipe with the term on ------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("teacher") / "base")


def gan_run(shards: Path, teacher: Path, *extra: str) -> list[str]:
    return tiny_run(
        shards,
        "recipe=dmd2_distill",
        f"teacher={teacher}",
        "module.dmd.ttur=2",
        "module.optim.lr=1e-3",
        "module.critic_optim.lr=1e-3",
        "module.dmd.gan.enabled=true",
        "module.dmd.gan.layers=[0,-1]",
        "module.dmd.gan.generator_weight=1.0",  # large enough to move the student visibly
        "trainer.log_every_n_steps=1",
        *extra,
    )


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_recipe_trains_the_head_with_the_critic_and_the_student_through_it(
    latent_shards, teacher_ckpt, tmp_path
):
    overrides = gan_run(latent_shards, teacher_ckpt, "trainer.max_steps=2")
    module = train(compose_train(overrides, tmp_path / "on")).lightning_module
    start = DMDGAN(module.gan.cfg, MagiHumanDiT(tiny()), seed=module.seed).head
    trained = module.gan.head.state_dict().values()
    for (name, before), after in zip(start.state_dict().items(), trained, strict=True):
        assert not torch.equal(before, after), name  # the critic's optimiser stepped the head
    opt_critic = module.trainer.optimizers[1]
    stepped = {id(p) for group in opt_critic.param_groups for p in group["params"]}
    assert all(id(p) in stepped for p in module.gan.parameters())
    assert all(p.grad is None for p in module.critic.parameters())  # the generator's are discarded
    rows = read_metrics(tmp_path / "on" / "csv" / "metrics.csv")
    for key in ("train/critic_gan_d_loss", "train/critic_gan_r1", "train/generator_gan_g_loss"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key
    ckpt = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"model", "critic", "ema", "gan"}

    off = train(compose_train([*overrides, "module.dmd.gan.enabled=false"], tmp_path / "off"))
    w = "final_linear_video.weight"
    assert not torch.equal(off.lightning_module.model.state_dict()[w], module.model.state_dict()[w])


def gan_module(teacher_ckpt, tmp_path):
    overrides = [
        "recipe=dmd2_distill",
        "model=tiny",
        f"teacher={teacher_ckpt}",
        "module.dmd.gan.enabled=true",
    ]
    module = instantiate(compose_train(overrides, tmp_path).module)
    module.configure_model()
    return module


def test_the_generator_gan_term_reaches_the_student_only_through_the_critic(teacher_ckpt, tmp_path):
    from test_dmd_recipe import _batch

    module = gan_module(teacher_ckpt, tmp_path)
    ctx = module._context(_batch())
    critic = module._velocity(module.critic, ctx)
    x0 = module._simulate(ctx, phase=0)
    s, eps = module._score_draw(ctx)
    loss, logs = module.gan.generator_loss(critic, x0, s=s, eps=eps)
    loss.backward()
    grad = module.model.final_linear_video.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and math.isfinite(logs["g_loss"])


def test_gan_on_prompt_only_data_is_a_short_error_naming_the_field(teacher_ckpt, tmp_path):
    from magitrain.errors import UserError

    module = gan_module(teacher_ckpt, tmp_path)
    batch = {
        "text_emb": torch.randn(2, 5, 64),
        "text_len": torch.tensor([5, 3]),
        "latent_shape": torch.tensor([[3, 4, 6], [3, 4, 6]]),
        "key": ["a", "b"],
    }
    with pytest.raises(UserError, match="video_latent"):
        module._context(batch)


def test_a_killed_run_with_the_gan_term_resumes_exactly(latent_shards, teacher_ckpt, tmp_path):
    overrides = gan_run(
        latent_shards,
        teacher_ckpt,
        "trainer.max_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.ema.start_step=1",
    )
    straight, resumed, _ = straight_and_resumed(overrides, tmp_path)
    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert want.keys() == got.keys() and any(k.startswith("gan.head.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    key = "train/critic_gan_d_loss"
    a = {r["step"]: r[key] for r in read_metrics(tmp_path / "straight" / "csv" / "metrics.csv") if r.get(key)}
    b = {
        r["step"]: r[key]
        for r in read_metrics(tmp_path / "killed" / "csv_resumed" / "metrics.csv")
        if r.get(key)
    }
    assert b and all(a[step] == b[step] for step in b)


def test_a_clip_without_audio_has_no_audio_pool_real_or_fake(teacher_ckpt, tmp_path):
    """`audio_mask` false (data.missing_audio=mask: the clip's audio is silence, not real audio): D's
    audio pool of that clip is left out for the real and the fake logits, in the recipe's critic
    phase and in the generator term. Shown by moving the tapped layer's audio-token features of one
    clip: the logits of a masked clip do not move, those of a clip with audio do. Catches the pool
    counting the masked clip's audio (the head ignoring `heard`, or the recipe not passing the
    batch's `audio_mask`); checked by planting each: this test then fails."""
    from test_dmd_recipe import _batch

    module = gan_module(teacher_ckpt, tmp_path)
    ctx = module._context(_batch() | {"audio_mask": torch.tensor([True, False])})
    critic = module._velocity(module.critic, ctx)
    with torch.no_grad():
        x0 = module._simulate(ctx, phase=0)
    s, eps = module._score_draw(ctx)
    n_video, n_audio = module.gan._tokens(x0)
    (layer,) = [
        module.critic.block.layers[i] for i in module.gan.cfg.layer_indices(len(module.critic.block.layers))
    ]

    def logits(moved: int | None) -> list[torch.Tensor]:
        def move(m, args, out):  # before the tap's hook: the head sees the moved features
            if moved is None:
                return out
            out = out.clone()
            out[moved, n_video : n_video + n_audio] += torch.linspace(
                -3, 3, out.shape[-1]
            )  # (not a constant: layer-normalised)
            return out

        handle = layer.register_forward_hook(move, prepend=True)
        try:
            with torch.no_grad():
                _, critic_logs = module._critic_loss_with_gan(critic, ctx, x0, s, eps)
                _, generator_logs = module.gan.generator_loss(critic, x0, s=s, eps=eps, heard=ctx["heard"])
        finally:
            handle.remove()
        return [critic_logs["gan_d_real"], critic_logs["gan_d_fake"], generator_logs["g_d_fake"]]

    plain = logits(None)
    for got, want in zip(logits(1), plain, strict=True):  # the masked clip: its audio is not judged
        torch.testing.assert_close(got, want)
    for got, want in zip(logits(0), plain, strict=True):  # the clip with audio: it is
        assert not torch.allclose(got, want)
