"""The memory options the planner recommends run: FSDP2 CPU offload, selective checkpointing."""

from __future__ import annotations

import pytest
from test_train_distributed import assert_runs_match, four_samples, run_train  # noqa: F401 (fixture)

from magitrain.model import get_config
from magitrain.parallel import ParallelConfig
from magitrain.plan import measure_step
from magitrain.recipes import FlowMatchingModule


@pytest.mark.slow
def test_fsdp2_cpu_offload_matches_one_process(four_samples, tmp_path):  # noqa: F811
    single, offload = tmp_path / "single", tmp_path / "offload"
    run_train(single, four_samples, devices=1, strategy="auto", batch_size=4)
    extra = ("module.parallel.param_dtype=float32", "module.parallel.cpu_offload=true")
    run_train(offload, four_samples, devices=2, strategy="fsdp2", batch_size=2, extra=extra)
    assert_runs_match(single, offload)


def _activations(**parallel) -> int:
    module = FlowMatchingModule(get_config("golden_tiny"), parallel=ParallelConfig(**parallel))
    return measure_step(module, 1, (9, 16, 16), 16, "bf16-mixed", fake=True).activations["step"]


def test_selective_checkpointing_sits_between_none_and_every_block():
    none = _activations(activation_checkpointing=False)
    every = _activations(activation_checkpointing=True)
    half = _activations(activation_checkpointing=True, checkpoint_every=2)
    assert every < half < none


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_every"):
        ParallelConfig(checkpoint_every=0)
