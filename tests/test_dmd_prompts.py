"""Data-free DMD-2: prompt shards (text embeddings + the geometry to generate, no video or audio)
written by `encode_shards.py --prompts` with the real text encoder, and the recipe trained on them."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, tiny_run
from hydra.utils import instantiate
from safetensors import safe_open

from magitrain.checkpoint import load_official, save_official
from magitrain.data.prompts import read_negative
from magitrain.data.shards import iter_tar
from magitrain.errors import UserError
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, tiny

CAPTIONS = ["A man says hello", "A woman sings", "A dog barks twice", "Rain on a window", "Waves at night"]
PROMPTS = "\n".join([CAPTIONS[0], "# a comment line", "", *CAPTIONS[1:]]) + "\n"


def encode_prompts(prompts_file: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "data_tools/encode_shards.py", "--prompts", str(prompts_file), str(out),
           "codecs=tiny", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prompt_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    (root / "prompts.txt").write_text(PROMPTS)
    result = encode_prompts(
        root / "prompts.txt", root / "shards", "--bucket", "64x96:0.32", "--per-shard", "3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    save_official(MagiHumanDiT(tiny()), root / "teacher")
    return root


def test_prompt_shards_hold_the_encoders_text_and_the_geometry_only(prompt_shards):
    from magitrain.codecs import build_tiny_codecs

    shards = sorted((prompt_shards / "shards").glob("*.tar"))
    assert [p.name for p in shards] == ["000000.tar", "000001.tar"]  # 5 prompts, 3 per shard
    rows = [r for p in shards for r in json.loads(p.with_suffix(".index.json").read_text())["samples"]]
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(5)]
    assert all(r["prompt_only"] and r["latent_shape"] == [3, 4, 6] and r["audio_len"] == 9 for r in rows)
    samples = [s for p in shards for s in iter_tar(str(p))]
    captions = [json.loads(s["json"])["caption"] for s in samples]
    assert captions == [
        "A man says hello",
        "A woman sings",
        "A dog barks twice",
        "Rain on a window",
        "Waves at night",
    ]
    path = prompt_shards / "one.safetensors"
    path.write_bytes(samples[1]["latents.safetensors"])
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["text_emb"] and f.metadata() == {"latent_shape": "3,4,6"}
        stored = f.get_tensor("text_emb")
    codecs = build_tiny_codecs(seed=0)
    emb, length = codecs.text.encode(["A woman sings"])
    torch.testing.assert_close(stored, emb[0, : int(length[0])])
    # the negative prompt of codecs=tiny, encoded once beside the shards (read by runs without codecs)
    codecs = instantiate(compose_train(["codecs=tiny"], prompt_shards / "cfg").codecs)
    emb, length = codecs.text.encode_negative(1)
    torch.testing.assert_close(
        read_negative(prompt_shards / "shards" / "negative.safetensors", 64), emb[0, : int(length[0])]
    )


def test_the_recipe_trains_on_prompt_shards_with_the_real_trainer(prompt_shards, tmp_path):
    overrides = tiny_run(
        prompt_shards / "shards",
        "recipe=dmd2_distill",
        "codecs=tiny",
        f"teacher={prompt_shards / 'teacher'}",
        "module.dmd.ttur=2",
        "module.optim.lr=1e-3",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
    )
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 2
    teacher = load_official(MagiHumanDiT(tiny()), prompt_shards / "teacher")  # the student's start
    w = "final_linear_video.weight"
    assert not torch.equal(trainer.lightning_module.model.state_dict()[w], teacher.state_dict()[w])
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/generator_loss"]) for r in rows if r.get("train/generator_loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"# only a comment\n\n", "holds no prompt"), (b"caf\xe9\n", "is not UTF-8")],
)
def test_a_bad_prompts_file_is_a_short_error_naming_it(content, message, tmp_path):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    result = encode_prompts(path, tmp_path / "out")
    assert result.returncode != 0
    assert f"prompts file {path} {message}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_missing_fields_are_errors_naming_them(prompt_shards, tmp_path):
    from magitrain.data.index import prompt_row

    with pytest.raises(ValueError, match="'latent_shape' in its safetensors metadata"):
        prompt_row({"text_emb": {"shape": [4, 64]}})
    # a latent sample that lost its video latents is a bad sample, not a prompt
    from safetensors.torch import save

    from magitrain.data.buckets import Bucket
    from magitrain.data.decode import BadSample, decode_latent

    sample = {"__key__": "k", "latents.safetensors": save({"text_emb": torch.zeros(4, 64)}),
              "json": b'{"caption": "x"}'}  # fmt: skip
    with pytest.raises(BadSample, match="missing tensors"):
        decode_latent(sample, Bucket(64, 96, 9, 1), 640, 64)
    overrides = [
        "recipe=dmd2_distill",
        "model=tiny",
        f"teacher={prompt_shards / 'teacher'}",
        "module.dmd.p_image=0.5",
    ]
    module = instantiate(compose_train(overrides, tmp_path).module)
    module.configure_model()
    batch = {
        "text_emb": torch.randn(2, 5, 64),
        "text_len": torch.tensor([5, 3]),
        "latent_shape": torch.tensor([[3, 4, 6], [3, 4, 6]]),
        "key": ["a", "b"],
    }
    with pytest.raises(UserError, match="no ref_latent"):
        module._context(batch)


def test_a_recipe_that_needs_clips_refuses_prompt_shards(prompt_shards, tmp_path):
    overrides = tiny_run(prompt_shards / "shards", "recipe=base_pretrain", "trainer.max_steps=1")
    with pytest.raises(UserError, match="holds prompt samples"):
        train(compose_train(overrides, tmp_path))
