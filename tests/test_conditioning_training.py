"""Training that conditions on a clean modality (issue 24, section 2): `flow.conditioning`
(p_a2v, p_v2a) and `flow.independent_sigmas` in the flow-matching recipes, `dmd.p_a2v` in DMD-2,
observed at the real (tiny) model's inputs and in its losses."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_train, tiny_run
from hydra.utils import instantiate

from magitrain.checkpoint import save_official
from magitrain.data.prompts import save_negative
from magitrain.flow import Conditioning
from magitrain.flow import dmd as core
from magitrain.flow import training as fm
from magitrain.model import MagiHumanDiT, tiny
from magitrain.recipes import FlowMatchingConfig, FlowMatchingModule


def _module(**flow) -> FlowMatchingModule:
    torch.manual_seed(0)
    module = FlowMatchingModule(tiny(), flow=FlowMatchingConfig(**flow))
    module.configure_model()
    return module


def _batch(B=4) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "video_latent": torch.randn(B, 48, 3, 4, 6, generator=g),
        "audio_latent": torch.randn(B, 9, 64, generator=g),
        "text_emb": torch.randn(B, 5, 64, generator=g),
        "text_len": torch.tensor([5, 3, 4, 2][:B]),
        "key": [f"k{i}" for i in range(B)],
    }


def _run(module, batch) -> tuple[dict, dict]:
    """(the model's inputs, flow_loss's outputs) of one loss computation."""
    seen = {}

    def keep(m, args, kwargs, out):
        seen.update(video=args[0], audio=args[1], text_len=kwargs["text_len"])

    hook = module.model.register_forward_hook(keep, with_kwargs=True)
    out = module.flow_loss(batch)
    hook.remove()
    return seen, out


def _scrambled(module, batch, modality: int) -> dict:
    """flow_loss with the model's output of one modality (0 video, 1 audio) moved by 100."""

    def scramble(m, args, out):
        out = list(out)
        out[modality] = out[modality] + 100.0
        return tuple(out)

    hook = module.model.register_forward_hook(scramble)
    out = module.flow_loss(batch)
    hook.remove()
    return out


def test_an_audio_driven_sample_gets_its_clean_audio_and_trains_its_video_only():
    module, batch = _module(p_image=0.0, p_drop_text=0.0, conditioning=Conditioning(p_a2v=1.0)), _batch()
    seen, out = _run(module, batch)
    assert torch.equal(seen["audio"], batch["audio_latent"])  # s = 0: exactly x0
    assert not torch.equal(seen["video"][:, :, 0], batch["video_latent"][:, :, 0])
    assert out["a2v"].all() and not out["v2a"].any() and (out["heard"] == 0).all()
    scrambled = _scrambled(module, batch, modality=1)  # the audio output leaves the loss alone ...
    torch.testing.assert_close(scrambled["loss"], out["loss"])
    assert _scrambled(module, batch, modality=0)["loss"] > out["loss"] + 100  # ... the video's does not


def test_a_video_to_audio_sample_gets_its_whole_clean_video_and_trains_its_audio_only():
    """Every frame is the clip's, frame 0 too, even for a sample whose image coin came up (p_image=1)
    and whose reference latent differs from its frame 0."""
    batch = _batch()
    batch["ref_latent"] = torch.randn(4, 48, 1, 4, 6)
    module = _module(p_image=1.0, p_drop_text=0.0, conditioning=Conditioning(p_v2a=1.0))
    seen, out = _run(module, batch)
    assert torch.equal(seen["video"], batch["video_latent"])
    assert not torch.equal(seen["audio"], batch["audio_latent"])
    assert out["v2a"].all() and (out["seen"] == 0).all() and (out["video"] == 0).all()
    torch.testing.assert_close(_scrambled(module, batch, modality=0)["loss"], out["loss"])
    assert _scrambled(module, batch, modality=1)["loss"] > out["loss"] + 100
    # in a mixed batch the video mean is over the samples whose video is trained (not diluted)
    mixed = _module(p_image=0.0, audio_weight=0.0, conditioning=Conditioning(p_v2a=0.5))
    out = mixed.flow_loss(batch)
    assert out["v2a"].any() and not out["v2a"].all()
    torch.testing.assert_close(out["loss"], out["video"][~out["v2a"]].mean())


def test_with_every_option_zero_the_draws_and_model_inputs_are_the_unconditioned_ones(monkeypatch):
    """p = 0 changes nothing, bit for bit: no generator of the conditioning stream is made, and the
    model's inputs are what the per-sample draws give without the feature (the interpolant at the
    shared s, the i2v frame, the text dropout); the same inputs and loss again with the options
    switched on at probabilities too small to fire: their draws leave the flow's streams alone."""
    streams = []
    real = FlowMatchingModule.sample_generators

    def recording(self, batch, stream=""):
        streams.append(stream)
        return real(self, batch, stream)

    monkeypatch.setattr(FlowMatchingModule, "sample_generators", recording)
    batch = _batch()
    module = _module(p_image=0.6, p_drop_text=0.5)
    seen, out = _run(module, batch)
    assert streams == [""]
    d = [module.draw_sample(g, batch) for g in real(module, batch)]
    s = torch.cat([x["s"] for x in d])
    video = fm.interpolate(batch["video_latent"], torch.stack([x["eps_video"] for x in d]), s)
    image = torch.stack([x["image"] for x in d])
    video[image, :, :1] = batch["video_latent"][image, :, :1]
    audio = fm.interpolate(batch["audio_latent"], torch.stack([x["eps_audio"] for x in d]), s)
    text_len = torch.where(torch.stack([x["drop_text"] for x in d]), 0, batch["text_len"])
    assert image.any() and not image.all() and text_len.eq(0).any()  # (every kind of sample)
    assert torch.equal(seen["video"], video) and torch.equal(seen["audio"], audio)
    assert torch.equal(seen["text_len"], text_len) and torch.equal(out["s"], s)

    rare = Conditioning(p_a2v=1e-9, p_v2a=1e-9)
    switched_on = _module(p_image=0.6, p_drop_text=0.5, conditioning=rare, independent_sigmas=1e-9)
    seen_on, out_on = _run(switched_on, batch)
    assert "conditioning" in streams
    assert all(torch.equal(seen[k], seen_on[k]) for k in seen) and torch.equal(out["loss"], out_on["loss"])


def test_clips_without_audio_are_never_conditioned():
    has_audio = torch.tensor([True, False, True, False])
    u = torch.tensor([0.1, 0.1, 0.7, 0.7])
    a2v, v2a = Conditioning(p_a2v=0.5, p_v2a=0.5).draw(u, has_audio)
    assert a2v.tolist() == [True, False, False, False] and v2a.tolist() == [False, False, True, False]
    module = _module(conditioning=Conditioning(p_a2v=1.0))
    _, out = _run(module, _batch() | {"audio_mask": has_audio})
    assert out["a2v"].tolist() == has_audio.tolist()
    with pytest.raises(ValueError, match="p_a2v \\+ p_v2a <= 1"):
        Conditioning(p_a2v=0.6, p_v2a=0.6)


def test_independent_sigmas_give_the_audio_a_noise_level_of_its_own():
    batch = _batch()
    shared, apart = _module(), _module(independent_sigmas=1.0)
    d_shared, d_apart = shared._draw(batch), apart._draw(batch)
    assert torch.equal(d_shared["s_audio"], d_shared["s_video"])
    assert torch.equal(d_apart["s_video"], d_shared["s_video"])  # the video's is the shared draw
    assert (d_apart["s_audio"] != d_apart["s_video"]).all()
    seen, _ = _run(apart, batch)
    eps = torch.stack([shared.draw_sample(g, batch)["eps_audio"] for g in shared.sample_generators(batch)])
    assert torch.equal(seen["audio"], fm.interpolate(batch["audio_latent"], eps, d_apart["s_audio"]))


def test_sr_refuses_the_options_it_has_no_use_for():
    from magitrain.recipes import SRConfig, SRFineTuneModule

    with pytest.raises(ValueError, match="not SR options"):
        SRFineTuneModule(tiny(), flow=SRConfig(conditioning=Conditioning(p_a2v=0.5)))


def test_a_lora_run_takes_the_options_and_logs_the_shares(latent_shards, tmp_path):
    """recipe=lora_base inherits flow.conditioning; the logged shares are the window's samples."""
    from magitrain.launch import train

    torch.manual_seed(0)
    base = save_official(MagiHumanDiT(tiny()), tmp_path / "base")
    overrides = tiny_run(
        latent_shards,
        "recipe=lora_base",
        f"init={base}",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "module.flow.conditioning.p_a2v=0.5",
        "module.flow.conditioning.p_v2a=0.5",
    )
    train(compose_train(overrides, tmp_path / "run"))
    with open(next((tmp_path / "run").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/frac_a2v")]
    assert len(rows) == 2
    for r in rows:  # batch 2, every sample one or the other
        assert float(r["train/frac_a2v"]) + float(r["train/frac_v2a"]) == 1.0


# ----- DMD-2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("dmd_a2v") / "teacher")


@pytest.fixture(scope="module")
def dmd_module(teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dmd_a2v_module")
    negative = save_negative(tmp / "negative", torch.randn(4, 64, generator=torch.Generator().manual_seed(3)))
    overrides = [
        "recipe=dmd2_distill",
        "model=tiny",
        f"teacher={teacher}",
        f"module.dmd.negative_emb={negative}",
        "module.dmd.p_a2v=1.0",
    ]
    module = instantiate(compose_train(overrides, tmp).module)
    module.configure_model()
    return module


def _dmd_pass(module, batch) -> tuple[dict, dict]:
    """A critic loss and a generator loss as a step runs them: (each network's audio inputs, the
    gradient of each trained network's audio head, None or zero if no audio loss reached it)."""
    audio_in = {name: [] for name in ("model", "teacher", "critic")}
    hooks = [
        getattr(module, n).register_forward_hook(lambda m, args, out, n=n: audio_in[n].append(args[1]))
        for n in audio_in
    ]
    module.zero_grad(set_to_none=True)
    ctx = module._context(batch)
    with torch.no_grad():
        x0 = module._simulate(ctx, phase=1)  # (two student calls: the re-noised input held too)
    s, eps = module._score_draw(ctx)
    core.critic_loss(module._critic_for_loss(ctx), x0, s=s, eps=eps, scored=ctx["scored"])[0].backward()
    x0 = module._simulate(ctx, phase=0)
    critic = module._velocity(module.critic, ctx)
    loss = core.generator_loss(x0, module._guided_teacher(ctx), critic, s=s, eps=eps, scored=ctx["scored"])
    loss[0].backward()
    for h in hooks:
        h.remove()
    heads = {n: getattr(module, n).final_linear_audio.weight.grad for n in ("model", "critic")}
    return audio_in, heads


def test_dmd_audio_driven_student_teacher_and_critic_see_the_same_clean_audio(dmd_module):
    batch = _batch() | {"audio_mask": torch.tensor([True, True, True, False])}
    assert dmd_module._context(batch)["a2v"].tolist() == [True, True, True, False]  # not the mute clip
    audio_in, heads = _dmd_pass(dmd_module, batch)
    assert [len(v) > 1 for v in audio_in.values()] == [True] * 3  # (each network, each call)
    for name, calls in audio_in.items():
        for audio in calls:
            assert torch.equal(audio[:3], batch["audio_latent"][:3]), name
            assert not torch.equal(audio[3], batch["audio_latent"][3]), name
    assert all(g is not None and g.abs().sum() > 0 for g in heads.values())  # the mute clip's audio
    # every clip driven: no audio loss reaches the student's or the critic's audio head
    _, heads = _dmd_pass(dmd_module, _batch())
    assert all(g is None or not g.any() for g in heads.values()), heads


def test_a_dmd_run_with_every_clip_audio_driven_never_moves_the_audio_heads(latent_shards, teacher, tmp_path):
    """The recipe's own step: with no weight decay a head that no loss reaches keeps its weights
    exactly (AdamW's update of zero gradients is zero), while the video heads move."""
    from magitrain.checkpoint import load_official
    from magitrain.launch import train

    overrides = tiny_run(
        latent_shards,
        "recipe=dmd2_distill",
        f"teacher={teacher}",
        "module.dmd.ttur=1",
        "module.dmd.p_a2v=1.0",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "module.optim.lr=1e-3",
        "module.critic_optim.lr=1e-3",
        "module.optim.weight_decay=0",
        "module.critic_optim.weight_decay=0",
    )
    module = train(compose_train(overrides, tmp_path)).lightning_module
    start = load_official(MagiHumanDiT(tiny()), teacher)
    for network in (module.model, module.critic):
        assert torch.equal(network.final_linear_audio.weight, start.final_linear_audio.weight)
        assert not torch.equal(network.final_linear_video.weight, start.final_linear_video.weight)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        shares = [float(r["train/frac_a2v"]) for r in csv.DictReader(f) if r.get("train/frac_a2v")]
    assert shares == [1.0, 1.0]


def test_dmd_losses_leave_out_the_samples_not_scored():
    """The core's `scored`: a sample left out changes neither the loss nor the logs, and the loss of
    the rest is their mean (one sample's modality replaced by garbage: same numbers)."""
    g = torch.Generator().manual_seed(0)
    x0 = {"audio": torch.randn(3, 9, 4, generator=g)}
    eps = {"audio": torch.randn(3, 9, 4, generator=g)}
    s = torch.tensor([0.3, 0.5, 0.7])

    def net(scale):
        return lambda x, s: {"audio": scale * x["audio"]}

    keep = {"audio": torch.tensor([True, False, True])}
    garbage = {"audio": x0["audio"].clone()}
    garbage["audio"][1] = 1e6
    for loss_fn in (
        lambda x: core.generator_loss(x, net(0.5), net(0.2), s=s, eps=eps, scored=keep),
        lambda x: core.critic_loss(net(0.3), x, s=s, eps=eps, scored=keep),
    ):
        (loss, logs), (loss_g, logs_g) = loss_fn(x0), loss_fn(garbage)
        torch.testing.assert_close(loss_g, loss)
        for k in logs:
            torch.testing.assert_close(logs_g[k], logs[k])
    pair = {"audio": x0["audio"][[0, 2]]}
    pair_eps = {"audio": eps["audio"][[0, 2]]}
    want, _ = core.critic_loss(net(0.3), pair, s=s[[0, 2]], eps=pair_eps)
    torch.testing.assert_close(core.critic_loss(net(0.3), x0, s=s, eps=eps, scored=keep)[0], want)


def test_the_planner_plans_a_conditioned_step_at_the_memory_of_an_unconditioned_one():
    """A clean modality still runs through the model: the fake step runs the options' draws and
    masks, and the plan is the one without them. (DMD-2 with dmd.p_a2v plans too, its networks fed a
    copy of the clean audio, 5 kB more here: checked once by hand, left out for the suite's time.)"""
    from magitrain.plan import plan

    bucket = {"height": 32, "width": 64, "frames": 9, "batch_size": 2}
    flow = "module.flow.conditioning"
    options = [f"{flow}.p_a2v=0.5", f"{flow}.p_v2a=0.5", "module.flow.independent_sigmas=0.5"]
    plain = plan(["model=tiny"], 1, 2**30, bucket)
    conditioned = plan(["model=tiny", *options], 1, 2**30, bucket)
    assert conditioned.per_gpu == plain.per_gpu and conditioned.total == plain.total
    assert conditioned.activations_by_phase == plain.activations_by_phase
