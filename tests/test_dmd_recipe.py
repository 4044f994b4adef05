"""The DMD-2 recipe (recipes/dmd2_distill.yaml, magitrain.recipes.DMD2Module) end to end on CPU:
networks by role, step semantics, losses and conditioning, exact resume, export -> infer.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, straight_and_resumed, tiny_run
from hydra.utils import instantiate
from lightning.pytorch import Callback

from magitrain.callbacks.nonfinite import TrainingDiverged
from magitrain.checkpoint import save_official
from magitrain.checkpoint.export import export
from magitrain.checkpoint.safe_load import load_torch_file
from magitrain.data.prompts import read_negative, save_negative
from magitrain.errors import UserError
from magitrain.flow import Guidance, cfg
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, tiny


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("teacher") / "base")


def dmd_run(shards: Path, teacher: Path, *extra: str, recipe: str = "dmd2_distill") -> list[str]:
    return tiny_run(
        shards,
        f"recipe={recipe}",
        f"teacher={teacher}",
        "module.dmd.ttur=2",
        "module.optim.lr=1e-3",  # large enough to see every network move in a few steps
        "module.critic_optim.lr=1e-3",
        *extra,
    )


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fast_run_steps_in_generator_updates_and_logs_per_network(latent_shards, teacher_ckpt, tmp_path):
    overrides = dmd_run(
        latent_shards,
        teacher_ckpt,
        "module.dmd.ttur=3",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "module.optim.warmup_steps=2",
        "module.critic_optim.warmup_steps=3",  # (shorter than the 4 steps: a longer one is clamped)
        "callbacks.ema.start_step=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "module.dmd.monitor_every=2",
        *_probe(),
    )
    trainer = train(compose_train(overrides, tmp_path))
    module = trainer.lightning_module
    assert trainer.global_step == 4  # generator updates, not the 16 optimiser steps
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")) == [
        "step00000002.ckpt",
        "step00000004.ckpt",
    ]
    rows = read_metrics(tmp_path / "csv" / "metrics.csv")
    keys = set().union(*(r.keys() for r in rows))
    for m in ("video", "audio"):
        for key in (f"train/generator_loss_{m}", f"train/generator_dmd_grad_{m}", f"train/critic_loss_{m}"):
            assert key in keys
    for key in (
        "train/grad_norm_student",
        "train/grad_norm_critic",
        "train/generator_step",
        "train/critic_step",
    ):
        assert key in keys
    assert "perf/critic_phase_s" in keys and "perf/generator_phase_s" in keys
    logged = {int(r["step"]): r for r in rows if r.get("train/critic_step")}
    assert [float(logged[s]["train/critic_step"]) for s in range(4)] == [3.0, 6.0, 9.0, 12.0]
    # both schedules count generator steps: warmup 2 and 3 generator steps
    lrs = {int(r["step"]): r for r in rows if r.get("lr-AdamW")}
    assert [float(lrs[s]["lr-AdamW"]) for s in range(3)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert [float(lrs[s]["lr-AdamW-1"]) for s in range(4)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])

    # networks by role: the student and critic moved, the teacher is frozen, bf16 and not saved
    start = MagiHumanDiT(tiny())
    from magitrain.checkpoint import load_official

    load_official(start, teacher_ckpt)
    w = "block.layers.1.attention.linear_qkv.weight"
    initial = start.state_dict()[w]
    assert not torch.equal(module.model.state_dict()[w], initial)
    assert not torch.equal(module.critic.state_dict()[w], initial)
    assert module.teacher.state_dict()[w].dtype == torch.bfloat16
    assert torch.equal(module.teacher.state_dict()[w], initial.bfloat16())
    assert module.teacher.final_linear_video.weight.dtype == torch.float32  # heads stay float32
    # no codecs: the teacher's unconditional prompt is the negative.safetensors beside the shards
    negative = read_negative(latent_shards / "negative.safetensors", 64)
    assert torch.equal(module.negative_prompt(1)[0][0], negative.float())
    assert module.negative_prompt(1)[1].tolist() == [negative.shape[0]]
    ckpt = load_torch_file(tmp_path / "checkpoints" / "last.ckpt")
    roots = {k.split(".")[0] for k in ckpt["state_dict"]}
    assert roots == {"model", "critic", "ema"}
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert ckpt["dmd_critic_steps"] == 12
    # EMA of the student only, updated after generator steps (never after a critic step): a copy
    # before step 3 (start_step), then lerp with 1 - 0.99 at steps 3 and 4
    after = {step: (model, ema) for step, model, ema in _probe_of(trainer).after}
    assert all(torch.equal(after[s][1][k], after[s][0][k]) for s in (1, 2) for k in after[s][0])
    for k, w2 in after[2][0].items():
        ema3 = torch.lerp(w2, after[3][0][k], 0.01)
        torch.testing.assert_close(after[3][1][k], ema3, rtol=1e-6, atol=1e-7, msg=k)
        ema4 = torch.lerp(ema3, after[4][0][k], 0.01)
        torch.testing.assert_close(after[4][1][k], ema4, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(after[4][0][w], after[3][0][w])  # the student moved: the lerp is seen
    assert torch.equal(module.ema.state_dict()[w], after[4][1][w])
    # issue 31's divergence signals: each network's update norm every monitor_every=2 generator
    # steps (the student's: the change of its weights by that step), the teacher gap every step
    norms = {int(r["step"]): r for r in rows if r.get("train/update_norm_student")}
    assert sorted(norms) == [0, 2]
    change = sum((after[3][0][k] - after[2][0][k]).double().pow(2).sum() for k in after[2][0]).sqrt()
    assert float(norms[2]["train/update_norm_student"]) == pytest.approx(float(change), rel=1e-4)
    critic = [float(r["train/update_norm_critic"]) for r in rows if r.get("train/update_norm_critic")]
    assert len(critic) == 2 and all(n > 0 for n in critic)
    for m in ("video", "audio"):
        gaps = [
            float(r[f"train/generator_teacher_gap_{m}"])
            for r in rows
            if r.get(f"train/generator_teacher_gap_{m}")
        ]
        assert len(gaps) == 4 and all(g > 0 for g in gaps)


def test_the_init_checkpoint_is_read_once(teacher_ckpt, tmp_path, monkeypatch):
    import magitrain.recipes.module as frame

    reads = []
    real = frame.load_official
    monkeypatch.setattr(frame, "load_official", lambda net, path: reads.append(str(path)) or real(net, path))
    module = instantiate(
        compose_train(["recipe=dmd2_distill", "model=tiny", f"teacher={teacher_ckpt}"], tmp_path).module
    )
    module.configure_model()
    assert reads == [str(teacher_ckpt)]
    for network in (module.critic, module.teacher):
        for (name, a), b in zip(
            module.model.state_dict().items(), network.state_dict().values(), strict=True
        ):
            assert torch.equal(a.to(b.dtype), b), name

    torch.manual_seed(5)
    other = save_official(MagiHumanDiT(tiny()), tmp_path / "other")
    reads.clear()
    overrides = ["recipe=dmd2_distill", "model=tiny", f"teacher={teacher_ckpt}", f"critic_init={other}"]
    module = instantiate(compose_train(overrides, tmp_path).module)
    module.configure_model()
    assert reads == [str(teacher_ckpt), str(other)]
    assert not torch.equal(module.critic.final_linear_video.weight, module.model.final_linear_video.weight)

    # student_init=other: the critic and the teacher both start from the teacher, read once
    reads.clear()
    overrides = ["recipe=dmd2_distill", "model=tiny", f"teacher={teacher_ckpt}", f"student_init={other}"]
    module = instantiate(compose_train(overrides, tmp_path).module)
    module.configure_model()
    assert reads == [str(other), str(teacher_ckpt)]
    for (name, a), b in zip(
        module.critic.state_dict().items(), module.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a.to(b.dtype), b), name
    assert not torch.equal(module.critic.final_linear_video.weight, module.model.final_linear_video.weight)


def test_the_recipe_refuses_a_trainer_clip_value_and_a_missing_teacher(latent_shards, teacher_ckpt, tmp_path):
    with pytest.raises(Exception, match="gradient_clip_val"):  # Lightning's own refusal
        train(
            compose_train(
                dmd_run(latent_shards, teacher_ckpt, "trainer.gradient_clip_val=1.0"), tmp_path / "a"
            )
        )
    with pytest.raises(ValueError, match="teacher=PATH"):
        train(compose_train(dmd_run(latent_shards, teacher_ckpt, "teacher=null"), tmp_path / "b"))


def test_deepspeed_is_refused_clearly(teacher_ckpt, tmp_path):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    try:
        strategy = DeepSpeedStrategy(stage=2)
    except Exception as err:  # noqa: BLE001 - some versions refuse a CPU-only machine here
        pytest.skip(f"DeepSpeedStrategy cannot be built here: {err}")
    module = instantiate(
        compose_train(["recipe=dmd2_distill", "model=tiny", f"teacher={teacher_ckpt}"], tmp_path).module
    )

    class _Trainer:  # setup() only reads the strategy
        pass

    trainer = _Trainer()
    trainer.strategy = strategy
    module._trainer = trainer
    with pytest.raises(ValueError, match="DeepSpeed drives one optimiser"):
        module.setup("fit")


def _module(teacher_ckpt, tmp_path, *extra):
    negative = save_negative(
        tmp_path / "negative", torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    )
    overrides = [
        "recipe=dmd2_distill",
        "model=tiny",
        f"teacher={teacher_ckpt}",
        f"module.dmd.negative_emb={negative}",
    ]
    module = instantiate(compose_train([*overrides, *extra], tmp_path).module)
    module.configure_model()
    return module


def _batch(B=2, T=3):
    g = torch.Generator().manual_seed(0)
    return {
        "video_latent": torch.randn(B, 48, T, 4, 6, generator=g),
        "audio_latent": torch.randn(B, 9, 64, generator=g),
        "text_emb": torch.randn(B, 5, 64, generator=g),
        "text_len": torch.tensor([5, 3]),
        "key": [f"k{i}" for i in range(B)],
    }


def test_teacher_guidance_is_the_standard_form_with_per_modality_scales(teacher_ckpt, tmp_path):
    module = _module(teacher_ckpt, tmp_path)
    batch = _batch()
    ctx = module._context(batch)
    x = {"video": torch.randn(2, 48, 3, 4, 6), "audio": torch.randn(2, 9, 64)}
    s = torch.tensor([0.9, 0.3])  # t = 900 (video scale 5) and t = 300 (video scale 2)
    got = module._guided_teacher(ctx)(x, s)
    neg, neg_len = module.negative_prompt(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c = module.teacher(x["video"], x["audio"], batch["text_emb"], text_len=batch["text_len"])
        u = module.teacher(x["video"], x["audio"], neg, text_len=neg_len)
    g = Guidance()
    for i, scale in enumerate((5.0, 2.0)):
        torch.testing.assert_close(got["video"][i], cfg(c[0][i].float(), u[0][i].float(), scale))
    torch.testing.assert_close(got["audio"], cfg(c[1].float(), u[1].float(), g.audio))
    assert module.negative_prompt(2)[0].data_ptr() == neg.data_ptr()  # encoded once, cached


def test_image_conditioned_frame_zero_is_clean_and_out_of_both_losses(teacher_ckpt, tmp_path):
    from magitrain.flow import dmd as core

    module = _module(teacher_ckpt, tmp_path, "module.dmd.p_image=1.0")
    batch = _batch()
    ctx = module._context(batch)
    assert (ctx["mask"][:, 0, 0] == 0).all()
    x0 = module._simulate(ctx, phase=0)
    ref = batch["video_latent"][:, :, :1]
    torch.testing.assert_close(x0["video"][:, :, :1], ref, atol=1e-5, rtol=0)
    s, eps = module._score_draw(ctx)
    critic = module._velocity(module.critic, ctx)
    loss, _ = core.generator_loss(x0, module._guided_teacher(ctx), critic, s=s, eps=eps)
    loss.backward()
    grad = module.model.final_linear_video.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # frame 0 gets no gradient: a loss on frame 0 alone does not reach the student
    module.model.zero_grad()
    x0 = module._simulate(ctx, phase=0)
    x0["video"][:, :, :1].sum().backward()
    assert (
        module.model.final_linear_video.weight.grad is None
        or not module.model.final_linear_video.weight.grad.any()
    )
    # the critic's velocity at frame 0 is the exact one: no critic loss there
    c = critic(core._noised({"video": x0["video"].detach()}, s, eps) | {"audio": eps["audio"]}, s)
    x_t = (1 - s.reshape(-1, 1, 1, 1, 1)) * x0["video"].detach() + s.reshape(-1, 1, 1, 1, 1) * eps["video"]
    target = eps["video"] - x0["video"].detach()
    torch.testing.assert_close(c["video"][:, :, :1], target[:, :, :1], atol=1e-4, rtol=0)
    assert x_t.shape == target.shape


def _nan_grads(network):
    for p in network.parameters():
        p.grad = torch.full_like(p, float("nan"))


def test_a_non_finite_update_is_skipped_and_repeated_ones_stop_the_run(teacher_ckpt, tmp_path):
    module = _module(teacher_ckpt, tmp_path, "module.dmd.max_nonfinite_steps=1")
    module.log = lambda *a, **k: None
    opt = torch.optim.AdamW(module.critic.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in module.critic.state_dict().items()}
    _nan_grads(module.critic)
    assert module._update(opt, module.critic, 10.0, "critic") is False
    assert all(torch.equal(before[k], v) for k, v in module.critic.state_dict().items())
    assert all(p.grad is None for p in module.critic.parameters()) and not opt.state
    for p in module.critic.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(TrainingDiverged, match="non-finite critic"):
        module._update(opt, module.critic, 10.0, "critic")


def test_an_always_non_finite_student_stops_the_run_although_the_critic_is_finite(teacher_ckpt, tmp_path):
    """Each network counts its own skips: the critic's finite updates (ttur per generator step)
    do not reset the student's count."""
    module = _module(teacher_ckpt, tmp_path, "module.dmd.max_nonfinite_steps=2")
    module.log = lambda *a, **k: None
    opt_student = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    opt_critic = torch.optim.AdamW(module.critic.parameters(), lr=1e-3)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite student"):
        for _ in range(3):  # generator iterations, ttur=2
            for _ in range(2):
                for p in module.critic.parameters():
                    p.grad = torch.ones_like(p)
                assert module._update(opt_critic, module.critic, 10.0, "critic")
            _nan_grads(module.model)
            assert not module._update(opt_student, module.model, 10.0, "student")


class _StudentProbe(Callback):
    """Records the student's and the EMA's weights after every generator iteration (counted from
    0), and makes the student's gradients NaN in the iterations `nan_at`."""

    def __init__(self, nan_at=()):
        self.nan_at, self.seen, self.after = set(nan_at), 0, []

    def on_train_start(self, trainer, pl_module):
        param = pl_module.model.final_linear_video.weight
        param.register_hook(lambda g: g * float("nan") if self.seen in self.nan_at else g)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = (
            {k: v.clone() for k, v in pl_module.model.state_dict().items()},
            {k: v.clone() for k, v in pl_module.ema.state_dict().items()},
        )
        self.after.append((trainer.global_step, *weights))
        self.seen += 1


def _probe(*nan_at: int) -> list[str]:
    return [f"+callbacks.probe._target_={__name__}._StudentProbe", f"+callbacks.probe.nan_at={list(nan_at)}"]


def _probe_of(trainer) -> _StudentProbe:
    (probe,) = [c for c in trainer.callbacks if isinstance(c, _StudentProbe)]
    return probe


def test_a_skipped_student_update_still_ends_the_generator_step(latent_shards, teacher_ckpt, tmp_path):
    """global_step, both schedules, checkpoints (and so signals) advance; weights and EMA do not."""
    overrides = dmd_run(
        latent_shards,
        teacher_ckpt,
        "trainer.max_steps=4",
        "module.optim.warmup_steps=8",
        "callbacks.ema.start_step=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    trainer = train(compose_train([*overrides, *_probe(1, 2)], tmp_path))
    probe = _probe_of(trainer)
    assert [step for step, _, _ in probe.after] == [1, 2, 3, 4]  # 4 iterations: no step is lost
    w = "final_linear_video.weight"
    (w0, e0), (w1, e1), (w2, e2), (w3, e3) = ((m[w], e[w]) for _, m, e in probe.after)
    assert torch.equal(w1, w0) and torch.equal(w2, w0) and not torch.equal(w3, w0)
    assert torch.equal(e1, e0) and torch.equal(e2, e0) and not torch.equal(e3, e0)
    assert [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs] == [4, 4]
    assert trainer.lightning_module._nonfinite == {"student": 0, "critic": 0}
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert names == ["step00000002.ckpt", "step00000004.ckpt"]


@pytest.fixture(scope="module")
def sr_pairs(tmp_path_factory) -> Path:
    """LR/HR latent pairs for the tiny model (SR grid 3x4x6, LR 3x2x3)."""
    from magitrain.data.synthetic import make_latent_dataset

    out = tmp_path_factory.mktemp("sr_pairs")
    make_latent_dataset(out, num_samples=8, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2)
    return out


# recipe=sr_dmd2_540p (SR distillation, tests/test_sr_dmd.py) on LR/HR pairs, the teacher a tiny SR checkpoint
@pytest.mark.parametrize("recipe", ["dmd2_distill", "sr_dmd2_540p"])
def test_a_killed_run_resumes_exactly(recipe, latent_shards, teacher_ckpt, tmp_path, request):
    """8 generator steps straight == a `train.py` SIGKILLed after its step-2 checkpoint + a resume."""
    overrides = dmd_run(
        latent_shards if recipe == "dmd2_distill" else request.getfixturevalue("sr_pairs"),
        teacher_ckpt,
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.ema.start_step=1",
        "module.dmd.p_image=0.5",
        recipe=recipe,
    )
    straight, resumed, step2 = straight_and_resumed(overrides, tmp_path)

    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert want.keys() == got.keys() and {k.split(".")[0] for k in want} == {"model", "critic", "ema"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    key = "train/generator_loss"
    straight_losses = {
        int(r["step"]): r[key]
        for r in read_metrics(tmp_path / "straight" / "csv" / "metrics.csv")
        if r.get(key)
    }
    resumed_losses = {
        int(r["step"]): r[key]
        for r in read_metrics(tmp_path / "killed" / "csv_resumed" / "metrics.csv")
        if r.get(key)
    }
    assert sorted(resumed_losses) == list(range(2, 8))
    assert all(resumed_losses[s] == straight_losses[s] for s in resumed_losses)
    assert resumed.lightning_module._critic_steps == straight.lightning_module._critic_steps == 16


def test_export_ema_gives_a_student_that_infer_py_samples_in_8_steps(latent_shards, teacher_ckpt, tmp_path):
    """Also: the export's config.json says it is an 8-step distilled student and infer.py samples
    it so without steps= or sampler= (it took steps=8 to mean the distilled sampler by chance); and
    the run logs its losses although a data epoch (2 batches) is shorter than the logging interval."""
    bucket = "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 8}]"
    overrides = dmd_run(
        latent_shards, teacher_ckpt, "callbacks.ema.start_step=0", bucket, "trainer.log_every_n_steps=3"
    )
    trainer = train(compose_train(overrides, tmp_path / "run"))
    assert any(r.get("train/generator_loss") for r in read_metrics(tmp_path / "run" / "csv" / "metrics.csv"))
    out = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "export", ema=True)
    assert json.loads((out / "config.json").read_text())["sampling"] == {"sampler": "distilled", "steps": 8}
    from magitrain.checkpoint import load_official

    loaded = load_official(MagiHumanDiT(tiny()), out)
    for k, v in trainer.lightning_module.ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    mp4 = tmp_path / "sample.mp4"
    cmd = [sys.executable, str(REPO / "infer.py"), f"ckpt={out}", "model=tiny", "codecs=tiny",
           "prompt=A man says hello", "seconds=0.32", "resolution=64x32", "seed=0",
           f"out={mp4}"]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert mp4.stat().st_size > 1000
    sampled = json.loads(mp4.with_suffix(".json").read_text())
    assert (sampled["sampler"], sampled["steps"]) == ("distilled", 8)


def test_validation_samples_the_student_beside_the_teacher(latent_shards, teacher_ckpt, tmp_path):
    """The student is sampled at every validation step and the frozen teacher once (its clip and
    scores cached per prompt and seed); each step logs the latents' RMS distance and the student's
    scores minus the teacher's."""
    from magitrain.eval.evaluate import EvalOptions, Evaluator

    overrides = dmd_run(
        latent_shards,
        teacher_ckpt,
        "codecs=tiny",
        "callbacks=dmd_validation",
        "callbacks.progress_bar=null",
        "trainer.max_steps=4",
        "callbacks.validation.every_n_steps=2",
        "callbacks.validation.prompts=[A man says hello]",
        "callbacks.validation.seconds=0.32",
        "callbacks.validation.resolution=64x32",
    )
    trainer = train(compose_train(overrides, tmp_path))
    student = tmp_path / "validation" / "step00000002" / "sample0.mp4"
    teacher = tmp_path / "validation_teacher" / "step00000002" / "sample0.mp4"
    assert student.stat().st_size > 1000 and teacher.stat().st_size > 1000
    assert student.read_bytes() != teacher.read_bytes()
    assert (tmp_path / "validation" / "step00000004" / "sample0.mp4").exists()
    assert not (tmp_path / "validation_teacher" / "step00000004").exists()  # the teacher, cached
    validations = [c for c in trainer.callbacks if type(c).__name__ == "Validation"]
    assert sorted(c.options["steps"] for c in validations) == [8, 32]
    # issue 31: validation shows how far the student's latents are from the teacher's (same noise)
    rows = [
        r for r in read_metrics(tmp_path / "csv" / "metrics.csv") if r.get("val/teacher_rms_to_student_video")
    ]
    assert [int(r["step"]) for r in rows] == [2, 4]
    student_latents, teacher_latents = (c.latents[0] for c in validations)
    for i, m in enumerate(("video", "audio")):
        want = (student_latents[i] - teacher_latents[i]).pow(2).mean().sqrt()
        assert float(rows[-1][f"val/teacher_rms_to_student_{m}"]) == pytest.approx(float(want), rel=1e-5)
        assert float(want) > 0
    # issue 23: the student's scores minus the teacher's, per validation step
    evaluator = Evaluator(EvalOptions())
    teacher_scores = evaluator.score(teacher)
    for row in rows:
        student_scores = evaluator.score(
            tmp_path / "validation" / f"step{int(row['step']):08d}" / "sample0.mp4"
        )
        for metric in ("av_confidence", "flicker", "silence_ratio"):
            delta = float(row[f"val/student_minus_teacher/{metric}"])
            assert delta == pytest.approx(
                student_scores[metric] - teacher_scores[metric], rel=1e-6, abs=1e-12
            )
            assert float(row[f"val/teacher/{metric}"]) == pytest.approx(teacher_scores[metric], rel=1e-6)


def test_the_critic_losses_logged_are_the_mean_over_the_ttur_phases(
    latent_shards, teacher_ckpt, tmp_path, monkeypatch
):
    from magitrain.flow import dmd as core

    losses, real = [], core.critic_loss

    def recorded(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        losses.append(float(logs["loss_video"]))
        return loss, logs

    monkeypatch.setattr(core, "critic_loss", recorded)
    overrides = dmd_run(latent_shards, teacher_ckpt, "module.dmd.ttur=3", "trainer.max_steps=1")
    train(compose_train([*overrides, "trainer.log_every_n_steps=1"], tmp_path))
    assert len(losses) == 3 and len(set(losses)) == 3
    (row,) = [r for r in read_metrics(tmp_path / "csv" / "metrics.csv") if r.get("train/critic_loss_video")]
    assert float(row["train/critic_loss_video"]) == pytest.approx(sum(losses) / 3, rel=1e-5)


def _noise_worker(rank: int, store: str, shape: tuple[int, int], out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from magitrain.recipes.module import MagiHumanModule

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    module = MagiHumanModule(tiny())
    module._device_mesh = init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "context_parallel"))
    gens = module.sample_generators({"text_emb": torch.zeros(2, 5, 64)})  # no keys
    torch.save({"dp": module.data_parallel_rank, "noise": torch.randn(4, generator=gens[0])}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(1, 2), (2, 1)], ids=["cp2", "dp2"])
def test_keyless_noise_follows_the_data_parallel_rank(shape, tmp_path):
    """Context-parallel ranks of one group share a batch and so its noise; data-parallel ranks
    read different batches and draw different noise."""
    import torch.multiprocessing as mp

    mp.spawn(_noise_worker, args=(str(tmp_path / "store"), shape, str(tmp_path / "out")), nprocs=2)
    a, b = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2))
    if shape == (1, 2):
        assert a["dp"] == b["dp"] == 0 and torch.equal(a["noise"], b["noise"])
    else:
        assert (a["dp"], b["dp"]) == (0, 1) and not torch.equal(a["noise"], b["noise"])


def _mixed_image_context(module):
    """A context whose sample 0 is image-conditioned and sample 1 is not."""
    from magitrain.flow import training as fm

    ctx = module._context(_batch())
    ctx["mask"] = fm.first_frame_mask(torch.empty(2, 1, 3, 1, 1), torch.tensor([True, False]))
    return ctx


def _grads(network) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    network.zero_grad(set_to_none=True)
    return grads


def test_image_conditioned_samples_weigh_as_the_mean_over_their_free_frames(teacher_ckpt, tmp_path):
    """Frame 0 (out of both losses) must not shrink a conditioned sample's weight by (T-1)/T: both
    gradients equal those of per-sample means over the free frames (the base recipe's masked MSE)."""
    from magitrain.flow import dmd as core
    from magitrain.flow.training import velocity_mse

    module = _module(teacher_ckpt, tmp_path, "module.dmd.p_image=0.5")
    ctx = _mixed_image_context(module)
    mask = ctx["mask"]
    with torch.no_grad():
        x0 = module._simulate(ctx, phase=0)
    s, eps = module._score_draw(ctx)

    # the critic: per-sample masked video MSE, then the batch mean (audio: no frame 0)
    core.critic_loss(module._critic_for_loss(ctx), x0, s=s, eps=eps)[0].backward()
    got = _grads(module.critic)
    critic = module._velocity(module.critic, ctx)
    v = critic(core._noised(x0, s, eps), s)
    want = velocity_mse(v["video"], eps["video"] - x0["video"], mask).mean()
    (want + velocity_mse(v["audio"], eps["audio"] - x0["audio"]).mean()).backward()
    for name, g in _grads(module.critic).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-8, msg=name)

    # the generator: the core's loss as is == per-sample losses over the free frames, averaged
    teacher = module._guided_teacher(ctx)
    x0 = module._simulate(ctx, phase=0)  # (the per-sample generators have moved on: one draw)
    loss = core.generator_loss(x0, teacher, critic, s=s, eps=eps, weights={"audio": 0.0})[0]
    loss.backward(retain_graph=True)
    got = _grads(module.model)
    with torch.no_grad():
        x_t = core._noised(x0, s, eps)
        real, fake = teacher(x_t, s), critic(x_t, s)
    total = 0.0
    for b in range(2):
        free = mask[b, 0, :, 0, 0].bool()  # the sample's free frames
        x = x0["video"][b][:, free]
        with torch.no_grad():
            x0_real = core._x0(x_t["video"][b], s[b], real["video"][b])[:, free]
            x0_fake = core._x0(x_t["video"][b], s[b], fake["video"][b])[:, free]
            g = (x0_fake - x0_real) / (x - x0_real).abs().mean()
        total = total + 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach()) / 2
    total.backward()
    for name, g in _grads(module.model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-9, msg=name)


def test_without_codecs_or_a_negative_embedding_the_run_says_how_to_give_one(
    latent_shards, teacher_ckpt, tmp_path
):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in latent_shards.iterdir():
        if f.name != "negative.safetensors":
            (bare / f.name).write_bytes(f.read_bytes())
    overrides = dmd_run(bare, teacher_ckpt, "trainer.max_steps=1")
    with pytest.raises(UserError, match=r"codecs=NAME.*module\.dmd\.negative_emb=PATH"):
        train(compose_train(overrides, tmp_path / "a"))
    # module.dmd.negative_emb=PATH: that file, checked by name
    path = save_negative(tmp_path / "mine", torch.randn(2, 64))
    trainer = train(compose_train([*overrides, f"module.dmd.negative_emb={path}"], tmp_path / "b"))
    assert torch.equal(trainer.lightning_module.negative_prompt(1)[0][0], read_negative(path, 64))
    with pytest.raises(UserError, match=r"mine/negative.safetensors: expected text_emb \[L, 32\]"):
        read_negative(path, 32)
    with pytest.raises(UserError, match="nowhere.safetensors does not exist"):
        read_negative(tmp_path / "nowhere.safetensors", 64)


class _CriticGradients(Callback):
    """Before the first generator step: the batch, copies of the student and critic, and hooks that
    keep each critic gradient as its backward leaves it (the critic's optimiser steps outside
    Lightning, so no optimiser hook sees it)."""

    def __init__(self):
        self.batch, self.networks, self.grads = None, None, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import copy

        self.batch = batch
        self.networks = {"model": copy.deepcopy(module.model), "critic": copy.deepcopy(module.critic)}
        for name, p in module.critic.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: self.grads.setdefault(name, []).append(p.grad.clone())
            )


def test_a_real_step_weighs_the_critic_loss_of_image_conditioned_samples(
    latent_shards, teacher_ckpt, tmp_path
):
    """One real DMD-2 `training_step` (ttur=1, p_image=1: every sample image-conditioned): the
    critic's gradients equal those of the weighted loss (per-sample video MSE over the free frames,
    then the batch mean; audio as is) recomputed on copies of the networks from before the step.
    Catches a `training_step` that calls the core's unweighted critic loss (the helper alone is
    tested above; its video gradient is then (T-1)/T = 2/3 of this); checked by planting that bug:
    this test then fails."""
    from magitrain.flow import dmd as core
    from magitrain.flow.training import velocity_mse

    overrides = tiny_run(
        latent_shards,
        "recipe=dmd2_distill",
        f"teacher={teacher_ckpt}",
        "trainer.max_steps=1",
        "module.dmd.ttur=1",
        "module.dmd.p_image=1.0",
        "callbacks.ema=null",
        f"+callbacks.grads._target_={__name__}._CriticGradients",
    )
    cfg = compose_train(overrides, tmp_path)
    (spy,) = [c for c in train(cfg).callbacks if isinstance(c, _CriticGradients)]
    assert set(spy.grads) == {n for n, _ in spy.networks["critic"].named_parameters()}
    assert all(len(g) == 1 for g in spy.grads.values())  # one critic backward

    again = instantiate(cfg.module)  # step 0 again: the same per-sample draws and exit step
    again.configure_model()
    again.model.load_state_dict(spy.networks["model"].state_dict())
    again.critic.load_state_dict(spy.networks["critic"].state_dict())
    ctx = again._context(spy.batch)
    mask = ctx["mask"]
    assert mask[:, 0, 0].eq(0).all() and mask[:, 0, 1:].eq(1).all()
    with torch.no_grad():
        x0 = again._simulate(ctx, phase=0)
    s, eps = again._score_draw(ctx)
    v = again._velocity(again.critic, ctx)(core._noised(x0, s, eps), s)
    video = velocity_mse(v["video"], eps["video"] - x0["video"], mask).mean()
    (video + velocity_mse(v["audio"], eps["audio"] - x0["audio"]).mean()).backward()
    for name, p in again.critic.named_parameters():
        torch.testing.assert_close(spy.grads[name][0], p.grad, rtol=1e-4, atol=1e-8, msg=name)


@pytest.mark.parametrize("recipe", ["dmd2_distill", "lora_dmd2"])
def test_the_cpu_demo_sets_the_rates_of_both_optimisers(recipe, tmp_path):
    """Issue 31: `experiment=cpu_demo` set `module.optim.lr` alone, which reached only the student
    (1e-3 against the critic's 4e-7: 2500:1 for a 5:1 recipe), and the README demo's student
    diverged. The demo now gives both optimisers its rates, in the recipe's ratio, and the same
    warmup; the base recipe keeps the demo's own rate."""
    cfg = compose_train(["experiment=cpu_demo", f"recipe={recipe}"], tmp_path)
    student, critic = cfg.module.optim, cfg.module.critic_optim
    assert critic.lr / student.lr == pytest.approx(cfg.module.dmd.critic_lr_ratio)
    assert student.warmup_steps == critic.warmup_steps == 0
    assert compose_train(["experiment=cpu_demo"], tmp_path).module.optim.lr == 1e-3


def test_rates_far_off_the_configured_ratio_give_one_warning(teacher_ckpt, tmp_path, caplog):
    """Issue 31: an override of the student's rate silently left the critic's behind; the recipe
    now warns (once) when critic lr / student lr is more than 10x off `dmd.critic_lr_ratio`."""
    import logging

    def warnings(*extra):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="magitrain"):
            overrides = ["recipe=dmd2_distill", "model=tiny", f"teacher={teacher_ckpt}", *extra]
            instantiate(compose_train(overrides, tmp_path).module)
        return [r.getMessage() for r in caplog.records if "critic_lr_ratio" in r.getMessage()]

    assert warnings() == []  # the recipe's own 2e-6 / 4e-7
    assert warnings("module.optim.lr=1e-5", "module.critic_optim.lr=1e-5") == []  # 5x off: tolerated
    (message,) = warnings("module.optim.lr=1e-3")  # the old demo: 4e-7 / 1e-3
    assert "module.critic_optim.lr=4e-07" in message and "module.optim.lr=0.001" in message
    assert len(warnings("module.critic_optim.lr=1e-3")) == 1  # the critic far ahead
