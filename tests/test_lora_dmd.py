"""LoRA-DMD (recipe=lora_dmd2) and SR LoRA (recipe=lora_sr_540p) on CPU at tiny size: one frozen base
shared by the student, the critic and the teacher; only adapters train; checkpointing recomputes
each role with its own adapters; exact resume from the small checkpoint; export -> infer.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, straight_and_resumed, tiny_run
from hydra.utils import instantiate

from magitrain.checkpoint import load_official, save_official
from magitrain.data.prompts import save_negative
from magitrain.errors import UserError
from magitrain.export import export
from magitrain.flow import dmd as core
from magitrain.launch import train
from magitrain.lora import LoraConfig, LoraDMD2Module, LoraSRFineTuneModule, build_frozen_base
from magitrain.lora.adapters import read_adapter
from magitrain.model import MagiHumanDiT, tiny

RANK = 4


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("lora_dmd_base") / "base")


def lora_dmd_run(shards: Path, base: Path, *extra: str) -> list[str]:
    return tiny_run(
        shards,
        "recipe=lora_dmd2",
        f"teacher={base}",
        "module.dmd.ttur=2",
        f"module.lora.rank={RANK}",
        "module.optim.lr=1e-2",  # toy steps: adapters visibly move
        "module.critic_optim.lr=1e-2",
        *extra,
    )


def frozen(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen parameters under their released names."""
    return {
        k.replace(".base_layer.", "."): v
        for k, v in network.state_dict().items()
        if ".lora_A." not in k and ".lora_B." not in k
    }


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 48, 3, 4, 6, generator=g),
        torch.randn(1, 9, 64, generator=g),
        torch.randn(1, 5, 64, generator=g),
    )


def test_only_the_two_adapter_sets_train_on_one_shared_base(latent_shards, base_ckpt, tmp_path):
    overrides = lora_dmd_run(latent_shards, base_ckpt, "trainer.max_steps=3", "callbacks.ema.start_step=1")
    trainer = train(compose_train(overrides, tmp_path))
    module = trainer.lightning_module
    assert isinstance(module, LoraDMD2Module) and trainer.global_step == 3  # generator steps
    student, critic, teacher = module.model, module.critic, module.teacher

    # one frozen base: the three roles hold the very same tensors, bit-identical to the loaded base
    original = frozen(build_frozen_base(tiny(), str(base_ckpt), "bf16"))
    for network in (student, critic, teacher):
        got = frozen(network)
        assert got.keys() == original.keys()
        for k in original:
            assert got[k].dtype == original[k].dtype and torch.equal(got[k], original[k]), k
    for k, t in frozen(teacher).items():
        assert frozen(student)[k].data_ptr() == frozen(critic)[k].data_ptr() == t.data_ptr(), k
    assert student.block.layers[1].attention.linear_qkv.get_base_layer().weight.dtype == torch.bfloat16

    # only adapters train: the student's and the critic's, each by its own optimiser, in float32
    def trained(network):
        return {k: p for k, p in network.named_parameters() if p.requires_grad}

    for network in (student, critic):
        params = trained(network)
        assert params and all(".default." in k and p.dtype == torch.float32 for k, p in params.items())
        assert all(float(p.abs().max()) > 0 for k, p in params.items() if ".lora_B." in k)  # moved
    assert not any(p.requires_grad for p in teacher.parameters())
    for optimizer, network in zip(trainer.optimizers, (student, critic), strict=True):
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimised == {id(p) for p in trained(network).values()}
        assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(trained(student).values(), trained(critic).values(), strict=True)
    )

    # the EMA shadows the student's adapter only
    shadow, live = module.ema_parameters()
    assert len(shadow) == len(live) == len(trained(student)) and module.ema is None
    assert any(not torch.equal(s, p) for s, p in zip(shadow, live, strict=True))

    # the checkpoint: both adapter sets, the student's EMA, both optimisers; no base
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    kinds = {(k.split(".")[0], k.split(".lora_")[1].split(".")[1]) for k in ckpt["state_dict"]}
    assert kinds == {("model", "default"), ("model", "ema"), ("critic", "default")}
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["dmd_critic_steps"] == 6


@torch.no_grad()
def test_the_teacher_is_the_base_with_adapters_off(latent_shards, base_ckpt, tmp_path):
    overrides = lora_dmd_run(latent_shards, base_ckpt, "trainer.max_steps=2")
    module = train(compose_train(overrides, tmp_path)).lightning_module
    # the original base as DMD-2 would hold its teacher: released weights, bf16 block linears
    from magitrain.inference.networks import to_inference_dtype

    original = load_official(to_inference_dtype(MagiHumanDiT(tiny()), torch.bfloat16), base_ckpt).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = original(*inputs())
        got = module.teacher(*inputs())
        student = module.model.eval()(*inputs())
        with _off(module.model):
            student_off = module.model(*inputs())
    for w, g, s, off in zip(want, got, student, student_off, strict=True):
        assert torch.equal(g, w)
        assert torch.equal(off, w)  # the student with its adapters switched off is the teacher
        assert (s.float() - w.float()).abs().max() > 1e-3  # and with them on, it is not


class _off:
    """PEFT's per-layer switch: every adapter of the network off, then back on."""

    def __init__(self, network):
        from magitrain.lora.adapters import lora_layers

        self.layers = list(lora_layers(network).values())

    def __enter__(self):
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.enable_adapters(True)


def _phases(module, batch) -> dict[str, torch.Tensor]:
    """A critic update's and a generator update's backward, as `training_step` runs them (the
    generator loss runs the critic and the teacher between the student's forward and backward);
    returns every adapter gradient."""
    ctx = module._context(batch)
    critic = module._velocity(module.critic, ctx)
    with torch.no_grad():
        x0 = module._simulate(ctx, 0)
    s, eps = module._score_draw(ctx)
    core.critic_loss(critic, x0, s=s, eps=eps)[0].backward()
    x0 = module._simulate(ctx, 1)  # the student's exit step, with grad (checkpointed)
    s, eps = module._score_draw(ctx)
    loss, _ = core.generator_loss(x0, module._guided_teacher(ctx), critic, s=s, eps=eps)
    loss.backward()
    return {
        f"{root}.{k}": p.grad.clone()
        for root, network in (("model", module.model), ("critic", module.critic))
        for k, p in network.named_parameters()
        if p.grad is not None
    }


def test_activation_checkpointing_recomputes_each_role_with_its_own_adapters(base_ckpt, tmp_path):
    grads, recomputed = {}, {}
    for ac in (False, True):
        overrides = [
            "recipe=lora_dmd2", "model=tiny", f"teacher={base_ckpt}", f"module.lora.rank={RANK}",
            "module.lora.base_dtype=fp32", f"module.parallel.activation_checkpointing={ac}",
            "module.dmd.student_steps=2",
            f"module.dmd.negative_emb={save_negative(tmp_path / 'negative', torch.zeros(1, 64))}",
        ]  # fmt: skip
        module = instantiate(compose_train(overrides, tmp_path).module)
        module.configure_model()
        assert module.model.activation_checkpointing is ac and module.critic.activation_checkpointing is ac
        g = torch.Generator().manual_seed(3)  # student and critic adapters differ from the start
        with torch.no_grad():
            for network in (module.model, module.critic):
                for k, p in network.named_parameters():
                    if ".lora_" in k:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        batch = {
            "video_latent": torch.randn(2, 48, 3, 4, 6, generator=g),
            "audio_latent": torch.randn(2, 9, 64, generator=g),
            "text_emb": torch.randn(2, 5, 64, generator=g),
            "text_len": torch.tensor([5, 3]),
            "key": ["a", "b"],
        }
        calls = []
        hook = module.model.block.layers[0].register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        grads[ac] = _phases(module, batch)
        hook.remove()
        recomputed[ac] = len(calls)
    assert recomputed[True] == recomputed[False] + 1  # the exit step's block 0, in the backward
    assert grads[False].keys() == grads[True].keys()
    assert any(k.startswith("model.") for k in grads[False]) and any(
        k.startswith("critic.") for k in grads[False]
    )
    for k, want in grads[False].items():
        assert want.abs().max() > 0, k
        torch.testing.assert_close(grads[True][k], want, rtol=1e-5, atol=1e-7, msg=k)


def test_a_killed_lora_dmd_run_resumes_exactly_from_its_small_checkpoint(latent_shards, base_ckpt, tmp_path):
    """6 generator steps straight == a `train.py` SIGKILLed after its step-2 checkpoint + a resume."""
    overrides = lora_dmd_run(
        latent_shards,
        base_ckpt,
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.ema.start_step=1",
        "module.dmd.p_image=0.5",
    )
    straight, resumed, step2 = straight_and_resumed(overrides, tmp_path)
    small = torch.load(step2, map_location="cpu", weights_only=True)
    assert all(".lora_" in k for k in small["state_dict"])
    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    from test_dmd_recipe import read_metrics

    def losses(path):
        return {
            int(r["step"]): r["train/generator_loss"]
            for r in read_metrics(path)
            if r.get("train/generator_loss")
        }

    straight_losses = losses(tmp_path / "straight" / "csv" / "metrics.csv")
    resumed_losses = losses(tmp_path / "killed" / "csv_resumed" / "metrics.csv")
    assert sorted(resumed_losses) == list(range(2, 6))
    assert all(resumed_losses[s] == straight_losses[s] for s in resumed_losses)
    assert resumed.lightning_module._critic_steps == straight.lightning_module._critic_steps == 12


def test_export_ema_student_adapter_and_infer_py_samples_it_in_8_steps(latent_shards, base_ckpt, tmp_path):
    trainer = train(
        compose_train(lora_dmd_run(latent_shards, base_ckpt, "callbacks.ema.start_step=0"), tmp_path / "run")
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    adapter = export(ckpt, tmp_path / "student.safetensors", ema=True)
    tensors, cfg, _ = read_adapter(adapter)
    assert cfg.rank == RANK and len(cfg.targets) == 16
    layer = trainer.lightning_module.model.block.layers[0].attention.linear_qkv
    assert torch.equal(
        tensors["block.layers.0.attention.linear_qkv.lora_B.weight"], layer.lora_B["ema"].weight
    )
    # --merge takes the teacher as the base it was trained on
    merged = export(ckpt, tmp_path / "merged", ema=True, merge=True)
    assert load_official(MagiHumanDiT(tiny()), merged) is not None
    import infer

    mp4 = tmp_path / "sample.mp4"
    infer.main([f"ckpt={base_ckpt}", f"lora={adapter}", "model=tiny", "codecs=tiny", "prompt=A man says hi",
                "seconds=0.32", "resolution=64x32", "steps=8", "seed=0", f"out={mp4}"])  # fmt: skip
    assert mp4.stat().st_size > 1000


def test_lora_dmd_refuses_full_network_inits_and_a_missing_teacher(base_ckpt):
    for init in ({"student_init": str(base_ckpt)}, {"critic_init": str(base_ckpt)}):
        with pytest.raises(UserError, match="module.lora.init"):
            LoraDMD2Module(model=tiny(), teacher=str(base_ckpt), **init)
    with pytest.raises(UserError, match="teacher=PATH"):
        LoraDMD2Module(model=tiny()).configure_model()
    from magitrain.recipes import DMDConfig

    with pytest.raises(UserError, match="teacher_offload cannot move it"):
        LoraDMD2Module(model=tiny(), teacher=str(base_ckpt), dmd=DMDConfig(teacher_offload=True))
    with pytest.raises(UserError, match="gan.enabled=true"):
        LoraDMD2Module(model=tiny(), teacher=str(base_ckpt), dmd=DMDConfig(gan={"enabled": True}))


# ----- SR LoRA ----------------------------------------------------------------------------------
def test_lora_sr_trains_adapters_and_infer_py_applies_them_like_the_merged_export(tmp_path, monkeypatch):
    import infer
    from magitrain.checkpoint.official import read_config
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.inference.pipeline import Generation

    shards = tmp_path / "pairs"
    make_latent_dataset(
        shards, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2
    )
    torch.manual_seed(1)
    sr_base = save_official(MagiHumanDiT(tiny().replace(coords_style="v1")), tmp_path / "sr_base")
    overrides = tiny_run(
        shards, "recipe=lora_sr_540p", f"init={sr_base}", f"module.lora.rank={RANK}",
        "module.lora.base_dtype=fp32", "module.optim.lr=1e-2",
    )  # fmt: skip
    trainer = train(compose_train(overrides, tmp_path / "run"))
    module = trainer.lightning_module
    assert isinstance(module, LoraSRFineTuneModule) and trainer.global_step == 3
    original = frozen(build_frozen_base(tiny(), str(sr_base), "fp32"))
    got = frozen(module.model)
    assert all(torch.equal(got[k], original[k]) for k in original)
    assert all(".lora_" in k for k, p in module.model.named_parameters() if p.requires_grad)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert all(".lora_" in k for k in torch.load(ckpt, weights_only=True)["state_dict"])

    # the merged export is the SR network with its adapters, in the released layout (v1 coords)
    merged_dir = export(ckpt, tmp_path / "merged", merge=True)
    assert read_config(merged_dir).coords_style == "v1"
    merged = load_official(MagiHumanDiT(read_config(merged_dir)), merged_dir).eval()
    with torch.no_grad():
        want = module.model.eval()(*inputs(), coords_style="v1")
        for w, g in zip(want, merged(*inputs(), coords_style="v1"), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    adapter = export(ckpt, tmp_path / "sr.safetensors")
    assert read_adapter(adapter)[1].rank == RANK

    # infer.py sr_lora= on the SR base == infer.py with the merged SR checkpoint (clips before mp4)
    clips = []
    monkeypatch.setattr(Generation, "save", lambda self, path: clips.append(self) or Path(path))
    torch.manual_seed(0)
    base = save_official(MagiHumanDiT(tiny()), tmp_path / "base")
    common = [f"ckpt={base}", "model=tiny", "codecs=tiny", "prompt=hello", "seconds=0.32", "resolution=64x32",
              "sr=128x64", "steps=8"]  # fmt: skip
    infer.main([*common, f"sr_ckpt={sr_base}", f"sr_lora={adapter}"])
    infer.main([*common, f"sr_ckpt={merged_dir}"])
    infer.main([*common, f"sr_ckpt={sr_base}"])
    lora, merged_clip, plain = clips
    assert lora.video.shape[-2:] == (64, 128)
    torch.testing.assert_close(lora.video, merged_clip.video, rtol=0, atol=1e-4)
    assert (lora.video - plain.video).abs().max() > 1e-3  # the SR adapter does change the clip
    # bad input names the argument
    with pytest.raises(UserError, match="sr_lora_scale=strong: expected a number"):
        infer.main([*common, f"sr_ckpt={sr_base}", f"sr_lora={adapter}", "sr_lora_scale=strong"])
    with pytest.raises(UserError, match="sr_lora= adapts the SR network"):
        infer.main([*common[:-2], f"sr_lora={adapter}"])


@pytest.mark.gpu
@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_lora_dmd_step_memory_on_gpu(base_dtype):
    """One LoRA-DMD generator iteration (a critic update, then a student update) of the 15B model at
    256p 5 s (random base, r=64, checkpointing): peak memory against docs/training.md's estimate."""
    from magitrain.model import magihuman_15b

    if base_dtype == "fp8":
        pytest.importorskip("torchao")
    config = magihuman_15b(activation_checkpointing=True)
    module = LoraDMD2Module(model=config, teacher="random", lora=LoraConfig(rank=64, base_dtype=base_dtype))
    module.frozen_base = lambda: build_frozen_base(config, None, base_dtype, "cuda")
    module.request_ema()
    module.configure_model()
    module.to("cuda")
    g = torch.Generator().manual_seed(0)
    batch = {
        "video_latent": torch.randn(1, 48, 32, 16, 28, generator=g).cuda(),  # 448x256, 5 s
        "audio_latent": torch.randn(1, 126, 64, generator=g).cuda(),
        "text_emb": torch.randn(1, 640, 3584, generator=g).cuda(),
        "text_len": torch.tensor([640]),
        "key": ["a"],
    }
    optimizers = [
        torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5, fused=True)
        for net in (module.model, module.critic)
    ]
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        _phases(module, batch)  # (the backward passes of one critic and one student update)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"LoRA-DMD r=64 {base_dtype} base, 256p 5 s generator iteration: peak {peak:.1f} GiB")
    assert peak < (52 if base_dtype == "bf16" else 38)


@pytest.mark.slow
def test_lora_dmd_under_ddp_matches_one_process(tmp_path):
    """Two gloo DDP ranks with batches of 2 == one process with the batch of 4: losses and adapters."""
    from test_dmd_distributed import LOSSES, losses

    from magitrain.checkpoint.export import read_training_checkpoint
    from magitrain.data.synthetic import make_latent_dataset

    shards = tmp_path / "four"
    make_latent_dataset(shards, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    torch.manual_seed(5)
    save_official(MagiHumanDiT(tiny()), shards / "base")

    def run(out, devices, strategy, batch_size):
        cmd = [sys.executable, "train.py", "recipe=lora_dmd2", "model=tiny", "trainer=cpu",
               f"trainer.devices={devices}", f"strategy={strategy}", "trainer.max_steps=2",
               "trainer.log_every_n_steps=1", "module.dmd.ttur=2", "module.dmd.p_image=0.5",
               f"module.lora.rank={RANK}", "module.lora.base_dtype=fp32", "module.optim.lr=1e-3",
               "module.critic_optim.lr=1e-3", "callbacks.ema.start_step=1", "callbacks.progress_bar=null",
               f"data.shards={shards}/*.tar", "data.num_workers=0", "data.shuffle=false",
               f"data.buckets=[{{height: 64, width: 96, frames: 9, batch_size: {batch_size}}}]",
               f"teacher={shards}/base", f"hydra.run.dir={out}"]  # fmt: skip
        if devices == 1:  # the reference, in this process (a process of its own costs its imports)
            train(compose_train(cmd[2:-1], out))
            return
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run(tmp_path / "one", 1, "auto", 4)
    run(tmp_path / "ddp", 2, "ddp", 2)
    want, got = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert len(want) == 2 * len(LOSSES) and want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), key
    one, _ = read_training_checkpoint(tmp_path / "one" / "checkpoints" / "last.ckpt")
    ddp, _ = read_training_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert one.keys() == ddp.keys() and {k.split(".")[0] for k in one} == {"model", "critic"}
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=5e-5, rtol=1e-4, msg=k)
    for root in ("model", "critic"):  # both adapter sets moved (unsynchronised grads would differ)
        assert any(
            float(one[k].abs().max()) > 1e-3 for k in one if k.startswith(f"{root}.") and ".lora_B." in k
        )


def test_an_fp8_base_lora_dmd_run_saves_and_resumes(latent_shards, base_ckpt, tmp_path):
    """The non-finite guard sees only the two adapter sets, never the float8 base."""
    pytest.importorskip("torchao")
    fp8 = ("module.lora.base_dtype=fp8", "callbacks.model_checkpoint.every_n_train_steps=2")
    train(compose_train(lora_dmd_run(latent_shards, base_ckpt, *fp8, "trainer.max_steps=2"), tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert {k.split(".")[0] for k in saved} == {"model", "critic"}
    resumed = lora_dmd_run(latent_shards, base_ckpt, *fp8, "trainer.max_steps=4", f"ckpt_path={ckpt}")
    trainer = train(compose_train(resumed, tmp_path / "b"))
    assert trainer.global_step == 4 and trainer.lightning_module.state_dict().keys() == saved.keys()
