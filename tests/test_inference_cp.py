"""Context-parallel generation: `torchrun --nproc-per-node 2 infer.py ... cp=2` on two gloo CPU
processes writes the same mp4 bytes as one process (fp32, same seed), for a base run and a
base + SR run whose SR network has frame-local attention; and the launch errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from magitrain.checkpoint import save_official
from magitrain.codecs import build_tiny_codecs
from magitrain.data.synthetic import write_wav
from magitrain.inference import ClipShape
from magitrain.model import MagiHumanDiT, get_config, tiny
from magitrain.parallel.context_parallel import slice_sizes, token_quantum

PROMPT, SECONDS, SIZE, SR = "A man says hello", 0.32, "160x64", "320x128"  # latents 3x4x10, then 3x8x20
SR_CONFIG = dict(coords_style="v1", local_attn_layers=(1, 2), frame_window=1)  # a 1080p-type SR model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cp_ckpts")
    torch.manual_seed(0)
    base = save_official(MagiHumanDiT(tiny()), root / "base")
    torch.manual_seed(1)
    sr = save_official(MagiHumanDiT(tiny(**SR_CONFIG)), root / "sr")
    return base, sr


def _infer(out: Path, ckpts, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    base, sr = ckpts
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = [*(launcher if ranks > 1 else [sys.executable]), str(REPO / "infer.py"), f"ckpt={base}",
           f"sr_ckpt={sr}", "codecs=tiny", f"prompt={PROMPT}", f"seconds={SECONDS}", f"resolution={SIZE}",
           "seed=3", "precision=fp32", f"out={out}", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # one thread in every process
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _sequence_splits(resolution: str) -> tuple[int, int, int]:
    clip = ClipShape.of(SECONDS, SIZE).with_resolution(resolution)
    t, h, w = clip.latent_size
    _, length = build_tiny_codecs(seed=0).text.encode([PROMPT])
    return (t * (h // 2) * (w // 2), clip.audio_tokens, int(length.max()))


@pytest.mark.parametrize(
    "sr, given", [("none", False), (SR, True)], ids=["base", "base+sr-local-attention+a2v"]
)
def test_two_gloo_ranks_write_the_same_mp4_bytes_as_one_process(checkpoints, sr, given, tmp_path):
    """With a given audio (a2v), rank 0 encodes it and broadcasts its latent; every rank holds it
    clean through the base stage, and the SR stage gets it (one case, the SR one: a pair of runs
    costs a minute of the suite)."""
    # Both ranks hold tokens of every forward, slices cut through a modality (RoPE slice, routing).
    for resolution in (SIZE, SR) if sr != "none" else (SIZE,):
        splits = _sequence_splits(resolution)
        sizes = slice_sizes(splits, 2, token_quantum(tiny()))
        assert min(sizes) > 0 and sizes[0] not in (0, splits[0], splits[0] + splits[1], sum(splits)), sizes

    extra = [f"sr={sr}"]
    if given:  # a 0.32 s chirp: the clip keeps its 9 frames
        t = np.arange(5120) / 16000
        write_wav(tmp_path / "chirp.wav", (0.5 * np.sin(2 * np.pi * (200 + 2000 * t) * t))[None], 16000)
        extra.append(f"audio={tmp_path / 'chirp.wav'}")
    one = _infer(tmp_path / "one.mp4", checkpoints, *extra)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _infer(tmp_path / "two.mp4", checkpoints, *extra, "cp=2", ranks=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]

    assert (tmp_path / "two.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes (the mp4 and its JSON on one line)
    record = json.loads((tmp_path / "two.json").read_text())
    assert record["cp"] == 2 and json.loads((tmp_path / "one.json").read_text())["cp"] == 1
    row = record["rows"][0]
    assert len(row["peak_gib_ranks"]) == 2 and (row["sr"] is None) == (sr == "none")


def test_cp_launch_errors_name_the_fix(checkpoints, tmp_path, monkeypatch, script):
    """infer.py's __main__ in this process; torchrun's environment (WORLD_SIZE) set by hand."""
    monkeypatch.syspath_prepend(str(REPO))
    import infer

    base, sr = checkpoints
    args = ["infer.py", f"ckpt={base}", f"sr_ckpt={sr}", "codecs=tiny", f"prompt={PROMPT}",
            f"seconds={SECONDS}", f"resolution={SIZE}", f"out={tmp_path / 'x.mp4'}"]  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = script(*args, "cp=2")
    assert alone.returncode == 2, alone.stderr
    assert "cp=2 needs 2 processes: run `torchrun --nproc-per-node 2" in alone.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    mismatch = script(*args, "cp=3")
    assert mismatch.returncode == 2
    assert "cp=3 but torchrun started 2 processes (WORLD_SIZE=2)" in mismatch.stderr
    assert not (tmp_path / "x.mp4").exists()

    network = MagiHumanDiT(get_config("tiny"))  # 2 kv heads
    infer.check_cp(2, network, "ckpt")
    with pytest.raises(
        infer.UserError, match="cp=4 does not fit the sr_ckpt network: .* must divide the model's 2 kv"
    ):
        infer.check_cp(4, network, "sr_ckpt")


def _compiled_cp_worker(rank: int, store: str) -> None:
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from magitrain.inference import MagiHumanPipeline, StageTimer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        codecs = build_tiny_codecs(seed=0)
        pipes = []
        for compile in ("none", "step"):
            torch.manual_seed(0)
            model = MagiHumanDiT(tiny()).eval().requires_grad_(False)
            pipes.append(
                MagiHumanPipeline(model, codecs, device="cpu", precision="fp32", group=dist.group.WORLD,
                                  compile=compile, compile_backend="eager")
            )  # fmt: skip
        clip = ClipShape.of(SECONDS, SIZE)
        text = pipes[0].encode_prompt(PROMPT, guidance=False)
        want = pipes[0].sample(text, clip, StageTimer("cpu"), seed=1)
        counters.clear()
        got = pipes[1].sample(text, clip, StageTimer("cpu"), seed=1)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    finally:
        dist.destroy_process_group()


def test_compiled_step_traces_the_ulysses_collectives_whole(tmp_path):
    """compile=step with cp=2: the slicing, all-to-alls and gather trace into the one step graph
    (the eager backend: no C++ build), and the result equals the eager CP run."""
    import torch.multiprocessing as mp

    mp.spawn(_compiled_cp_worker, args=(str(tmp_path / "store"),), nprocs=2)
