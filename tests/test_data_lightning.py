"""Through a real Lightning Trainer: the DataModule's position is saved in the checkpoint, and a run
resumed mid-epoch trains on exactly the batches the uninterrupted run trained on."""

import lightning as L
import pytest
import torch

from magitrain.data.datamodule import MagiDataModule
from magitrain.data.synthetic import make_latent_dataset

BUCKETS = [
    {"height": 64, "width": 128, "seconds": 1, "batch_size": 2},
    {"height": 64, "width": 128, "seconds": 2, "batch_size": 3},
]


class KeyRecorder(L.LightningModule):
    """A one-parameter model that remembers the sample keys of every training step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.steps: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        assert "_data" not in batch
        self.steps.append(list(batch["key"]))
        return (self.w - batch["video_latent"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(shards: str, max_steps: int, ckpt_in=None, ckpt_out=None) -> list[list[str]]:
    dm = MagiDataModule(mode="latent", shards=shards, buckets=BUCKETS, num_workers=2, shuffle_buffer=4)
    model = KeyRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return model.steps


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_through_lightning_checkpoint(tmp_path):
    make_latent_dataset(
        tmp_path, num_samples=14, per_shard=5, latent_shapes=((7, 4, 8), (13, 4, 8)), text_dim=8
    )
    shards = str(tmp_path / "*.tar")
    full = fit(shards, max_steps=20)  # two epochs and a bit: 8 batches per epoch
    assert sorted(k for step in full[:8] for k in step) == sorted(k for step in full[8:16] for k in step)
    first = fit(shards, max_steps=11, ckpt_out=tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["MagiDataModule"]
    assert (state["epoch"], state["consumed"]) == (1, 3)
    second = fit(shards, max_steps=20, ckpt_in=tmp_path / "mid.ckpt")
    assert first + second == full
