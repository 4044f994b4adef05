"""Ulysses context parallelism on gloo CPU processes equals one process: the model's forward
and backward (local mask, padded text, slices of unequal length, a padded reference audio, TREAD
routing, and both) with cp=2 and with dp=2 x cp=2, and SR training steps with dp=1 x cp=2."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magitrain.model import MagiHumanDiT, get_config, tiny
from magitrain.parallel.context_parallel import average_gradients, check_degree, enable_context_parallel

CP = 2


def _config():
    # frame-local attention in layers 0 and 2 (window 1 over 3 latent frames), sandwich layers 0 and 3
    return tiny(local_attn_layers=(0, 2), frame_window=1, coords_style="v1")


def _inputs(audio_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 48, 3, 4, 6, generator=g)  # 3 x 2 x 3 = 18 video tokens
    audio = torch.randn(2, audio_tokens, 64, generator=g)
    text = torch.randn(2, 6, 64, generator=g)
    text_len = torch.tensor([6, 2])  # the second prompt padded
    weights = (torch.randn(2, 48, 3, 4, 6, generator=g), torch.randn(2, audio_tokens, 64, generator=g))
    return video, audio, text, text_len, weights


def _forward_backward(model, inputs, **kwargs):
    video, audio, text, text_len, (w_video, w_audio) = inputs
    model.zero_grad(set_to_none=True)
    v_video, v_audio = model(video, audio, text, text_len=text_len, **kwargs)
    ((v_video * w_video).sum() + (v_audio * w_audio).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return (v_video.detach(), v_audio.detach()), grads


def _init(rank: int, store: str, world_size: int = CP) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


def _model_worker(rank: int, store: str, audio_tokens: int) -> None:
    _init(rank, store)
    try:
        torch.manual_seed(0)
        model = MagiHumanDiT(_config())
        reference = MagiHumanDiT(_config())
        reference.load_state_dict(model.state_dict())
        inputs = _inputs(audio_tokens)
        g = torch.Generator().manual_seed(1)  # a voice reference, the second sample's padded
        voice = {"ref_audio": torch.randn(2, 7, 64, generator=g), "ref_len": torch.tensor([7, 3])}
        enable_context_parallel(model, dist.group.WORLD)
        # TREAD: half the video (and audio) tokens set aside in layers 1..2, the kept ones re-split
        from magitrain.flow.tread import TreadConfig

        tread = TreadConfig(rate=0.5, start_layer=1, end_layer=2, modalities=("video", "audio"))
        gens = [torch.Generator().manual_seed(b) for b in range(2)]
        route = {"route": tread.draw(gens, {"video": 18, "audio": audio_tokens}, 4, "cpu")}
        for kwargs in ({}, voice, route, {**voice, **route}):
            expected, expected_grads = _forward_backward(reference, inputs, **kwargs)
            outputs, _ = _forward_backward(model, inputs, **kwargs)
            average_gradients(model, dist.group.WORLD)
            for got, want in zip(outputs, expected, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("audio_tokens", [9, 8], ids=["even-slices", "uneven-slices"])
def test_cp2_forward_and_backward_equal_one_process(audio_tokens, tmp_path):
    # 18 video + 9 audio + 6 text = 33 tokens: slices of 16 and 17 (8 + 8 audio tokens: 16 and 16)
    mp.spawn(_model_worker, args=(str(tmp_path / "store"), audio_tokens), nprocs=CP)


DP = 2


def _dp_cp_worker(rank: int, store: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, store, DP * CP)
    try:
        mesh = init_device_mesh("cpu", (DP, CP), mesh_dim_names=("data_parallel", "context_parallel"))
        torch.manual_seed(0)
        model = MagiHumanDiT(_config())
        reference = MagiHumanDiT(_config())
        reference.load_state_dict(model.state_dict())
        expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for replica in range(DP):  # one process: the mean gradient of both replicas' batches
            reference.zero_grad(set_to_none=True)
            for name, grad in _forward_backward(reference, _inputs(9, seed=replica))[1].items():
                expected[name] += grad / DP

        enable_context_parallel(model, mesh["context_parallel"].get_group())
        _forward_backward(model, _inputs(9, seed=mesh["data_parallel"].get_local_rank()))
        average_gradients(model, mesh["context_parallel"].get_group())
        average_gradients(model, mesh["data_parallel"].get_group())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


def test_dp2_cp2_backward_equals_one_process(tmp_path):
    """Four gloo ranks, two CP groups ({0, 1} and {2, 3}): the backward of the final all-gather
    must not take group ranks for global ones (torch.distributed.nn's all_gather did off NCCL:
    "Global rank 0 is not part of group" on the second group's first backward)."""
    mp.spawn(_dp_cp_worker, args=(str(tmp_path / "store"),), nprocs=DP * CP)


def _sr_steps(module, batch, steps: int, group=None) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        module.flow_loss(batch)["loss"].backward()
        if group is not None:
            average_gradients(module.model, group)
        optimizer.step()
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def _sr_module():
    from magitrain.recipes import SRConfig, SRFineTuneModule

    torch.manual_seed(0)
    module = SRFineTuneModule(_config(), flow=SRConfig(p_image=0.5))
    module.configure_model()
    return module


def _sr_batch():
    g = torch.Generator().manual_seed(1)
    return {
        "video_latent": torch.randn(2, 48, 3, 4, 6, generator=g),
        "lr_video_latent": torch.randn(2, 48, 3, 2, 3, generator=g),
        "audio_latent": torch.randn(2, 9, 64, generator=g),
        "text_emb": torch.randn(2, 5, 64, generator=g),
        "text_len": torch.tensor([5, 3]),
        "key": ["a", "b"],
    }


def _sr_worker(rank: int, store: str) -> None:
    _init(rank, store)
    try:
        expected = _sr_steps(_sr_module(), _sr_batch(), 3)
        module = _sr_module()  # both CP ranks read the same batch and draw the same noise
        enable_context_parallel(module.model, dist.group.WORLD)
        got = _sr_steps(module, _sr_batch(), 3, dist.group.WORLD)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
        start = dict(_sr_module().model.named_parameters())
        assert any(not torch.equal(value, start[name]) for name, value in expected.items())  # it trained
    finally:
        dist.destroy_process_group()


def test_sr_training_steps_dp1_cp2_equal_one_process(tmp_path):
    mp.spawn(_sr_worker, args=(str(tmp_path / "store"),), nprocs=CP)


@pytest.mark.parametrize(
    ("kv_heads", "degree", "ok"), [(8, 2, True), (8, 8, True), (8, 3, False), (2, 4, False)]
)
def test_the_cp_degree_must_divide_the_kv_heads(kv_heads, degree, ok):
    config = tiny(num_heads_q=kv_heads, num_heads_kv=kv_heads)
    if ok:
        check_degree(config, degree)
    else:
        with pytest.raises(ValueError, match=f"must divide the model's {kv_heads} kv heads"):
            check_degree(config, degree)


@pytest.mark.slow
def test_sr_recipe_under_fsdp2_with_context_parallel_matches_one_process(tmp_path):
    """`train.py recipe=sr_finetune_540p strategy=fsdp2 strategy.context_parallel=2` on two gloo
    ranks (mesh dp=1 x cp=2): the same losses and weights as one process on the same batches."""
    import subprocess
    import sys

    from conftest import REPO, compose_train
    from test_train_base import step_losses
    from test_train_distributed import model_weights

    from magitrain.checkpoint import save_official
    from magitrain.data.synthetic import make_latent_dataset
    from magitrain.launch import train

    shards = tmp_path / "pairs"
    make_latent_dataset(
        shards, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64, sr_factor=2
    )
    torch.manual_seed(5)
    save_official(MagiHumanDiT(tiny()), shards / "init")

    def run(out, devices: int, *extra: str) -> None:
        cmd = [
            sys.executable, "train.py", "recipe=sr_finetune_540p", "model=tiny", "trainer=cpu",
            f"trainer.devices={devices}", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "module.optim.warmup_steps=1", "module.parallel.param_dtype=float32",
            "callbacks.progress_bar=null", "callbacks.ema=null",
            "callbacks.model_checkpoint.every_n_train_steps=2", f"data.shards={shards}/*.tar",
            "data.num_workers=0", "data.shuffle=false",
            "data.buckets=[{height: 64, width: 96, frames: 9, batch_size: 2}]", f"init={shards}/init",
            f"hydra.run.dir={out}", *extra,
        ]  # fmt: skip
        if devices == 1:  # the reference, in this process (a process of its own costs its imports)
            train(compose_train([a for a in cmd[2:] if not a.startswith("hydra.run.dir=")], out))
            return
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run(tmp_path / "one", 1, "strategy=auto")
    run(tmp_path / "cp", 2, "strategy=fsdp2", "strategy.context_parallel=2")
    want, got = (
        step_losses(tmp_path / "one" / "csv" / "metrics.csv"),
        step_losses(tmp_path / "cp" / "csv" / "metrics.csv"),
    )
    assert sorted(got) == sorted(want) == [0, 1]
    logs = "".join(p.read_text() for p in (tmp_path / "cp").glob("*.log"))
    assert "Ulysses context parallelism: dp=1 x cp=2" in logs
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    w_one, w_cp = (
        model_weights(tmp_path / "one" / "checkpoints" / "last.ckpt"),
        model_weights(tmp_path / "cp" / "checkpoints" / "last.ckpt"),
    )
    for k in w_one:
        torch.testing.assert_close(w_cp[k], w_one[k], atol=1e-5, rtol=1e-4, msg=k)


def test_slices_are_aligned_balanced_and_cut_no_small_pieces():
    from magitrain.parallel.context_parallel import MIN_ROWS, slice_sizes, token_quantum

    assert token_quantum(tiny()) == 8  # swiglu width 168 = 8 x 21: 8 tokens fill whole 64-float blocks
    assert token_quantum(get_config("magihuman_15b")) == 16  # swiglu width 13652 = 4 x 3413
    for splits, cp, q in [
        ((3584, 126, 100), 8, 16),
        ((24, 9, 5), 2, 8),
        ((30, 17, 11), 2, 8),
        ((6, 9, 7), 2, 8),
    ]:
        sizes = slice_sizes(splits, cp, q)
        assert len(sizes) == cp and sum(sizes) == sum(splits)
        bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
        assert all(b % q == 0 for b in bounds[:-1])
        assert all(n == 0 or n >= MIN_ROWS for n in sizes)
        edges = torch.tensor((0, *splits)).cumsum(0).tolist()
        for b in bounds:  # a cut inside a modality leaves at least MIN_ROWS tokens on each side
            assert all(
                not (lo < b < hi) or min(b - lo, hi - b) >= MIN_ROWS for lo, hi in itertools.pairwise(edges)
            )
    assert max(slice_sizes((3584, 126, 100), 8, 16)) - min(slice_sizes((3584, 126, 100), 8, 16)) <= 32
