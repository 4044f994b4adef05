"""GPU-only checks: DeepSpeed ZeRO-2/3 and bf16 FSDP2 training steps, compiled flex attention.

Lightning's DeepSpeedStrategy (and FSDP1) refuse a CPU, so these run only where CUDA is present
(the `gpu` marker skips them elsewhere). World size 1 is enough to exercise the code paths:
sharded init, partitioned parameters, strategy checkpoints and their export.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from test_train_base import tiny_run

from magitrain.checkpoint import load_official
from magitrain.checkpoint.export import export
from magitrain.launch import train
from magitrain.model import MagiHumanDiT, SequenceLayout, attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_training_step_and_export_on_gpu(strategy, latent_shards, tmp_path):
    ema = ["callbacks.ema=null"] if strategy == "deepspeed_zero3" else []  # EMA refuses ZeRO-3
    overrides = tiny_run(
        latent_shards,
        "trainer=gpu",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"strategy={strategy}",
        "module.parallel.activation_checkpointing=true",
        *ema,
    )
    trainer = train(compose_train(overrides, tmp_path))
    assert trainer.global_step == 3
    out = export(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "export", ema=False)
    load_official(MagiHumanDiT(trainer.lightning_module.model_config), out)


def test_compiled_flex_attention_matches_the_dense_mask_on_gpu():
    layout = SequenceLayout(2, 5, 4, 6, 17, 9, torch.tensor([9, 4]))
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 8, layout.seq_len, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (
        torch.randn(2, 2, layout.seq_len, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    for window in (None, 1):
        dense = attention(q, k, v, layout.dense_mask(window, "cuda"), backend="sdpa")
        flex = attention(q, k, v, layout.block_mask(window, "cuda"), backend="flex")
        torch.testing.assert_close(flex.float(), dense.float(), atol=2e-2, rtol=2e-2)
