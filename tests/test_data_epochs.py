"""Data epochs of different lengths through a real Lightning Trainer (2 DataLoader workers, two
buckets): every epoch trains every sample once, the workers' shared-memory slots all come back,
and a run resumed at any step trains what the uninterrupted run trained."""

import gc
from collections import Counter

import lightning as L
import pytest
import torch

from magitrain.data.datamodule import MagiDataModule
from magitrain.data.synthetic import make_latent_dataset

BUCKETS = [
    {"height": 64, "width": 128, "seconds": 1, "batch_size": 2},
    {"height": 64, "width": 128, "seconds": 2, "batch_size": 3},
]
EPOCHS = 14
# with 13 samples in shards of 3 and seed 2, epoch 0 has 6 batches per rank and epochs 1, 2 have 8
OPTIONS = {"mode": "latent", "buckets": BUCKETS, "num_workers": 2, "shuffle_buffer": 4, "seed": 2}


class KeyRecorder(L.LightningModule):
    """A one-parameter model that remembers the sample keys of every training step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.steps: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.steps.append(list(batch["key"]))
        return (self.w - batch["video_latent"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("epochs")
    make_latent_dataset(out, num_samples=13, per_shard=3, latent_shapes=((7, 4, 8), (13, 4, 8)), text_dim=8)
    return str(out / "*.tar")


def fit(dm: MagiDataModule, max_steps: int, ckpt_in=None, ckpt_out=None) -> list[list[str]]:
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


def epoch_lengths(dm: MagiDataModule, epochs: int) -> list[int]:
    dm.setup()
    return [dm.dataset.batches_in_epoch(e) for e in range(epochs)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_epoch_trains_every_sample_and_resumes_exactly(shards, tmp_path):
    """Lightning fixed the epoch length from the first len(): longer epochs lost their tail
    batches (never trained), the in-flight batches leaked their shared-memory slots, and a
    checkpoint at the cut resumed into the skipped tail."""
    dm = MagiDataModule(shards=shards, **OPTIONS)
    lengths = epoch_lengths(dm, EPOCHS)
    assert lengths[0] < max(lengths)  # the case: an epoch longer than the first
    full = fit(dm, max_steps=sum(lengths))
    keys = sorted(k for step in full[: lengths[0]] for k in step)
    assert len(keys) == 13
    for e in range(EPOCHS):
        epoch = full[sum(lengths[:e]) : sum(lengths[: e + 1])]
        assert sorted(k for step in epoch for k in step) == keys, e
    gc.collect()
    counts = dm.dataset.ring_counts  # [worker, lent | returned, slot]
    in_flight = (counts[:, 0] - counts[:, 1]).sum(dim=1)
    assert (in_flight <= dm.loader_options["prefetch_factor"]).all(), (
        counts
    )  # only what the workers held at the end
    assert counts[:, 1].sum() > sum(lengths) // 2  # the ring served most batches: slots came back

    # resume at the end of the first epoch, in the tail of a longer one, and at its end
    for stop in (lengths[0], lengths[0] + lengths[1] - 1, lengths[0] + lengths[1]):
        ckpt = tmp_path / f"step{stop}.ckpt"
        first = fit(MagiDataModule(shards=shards, **OPTIONS), max_steps=stop, ckpt_out=ckpt)
        second = fit(MagiDataModule(shards=shards, **OPTIONS), max_steps=stop + 4, ckpt_in=ckpt)
        assert first + second == full[: stop + 4], stop


def test_resume_at_every_step_of_fourteen_epochs(shards):
    """The cheap check of every step: a DataModule restored from the state saved after step s
    continues with batch s of the uninterrupted stream (read from the workers' parts of the plan,
    without starting processes)."""
    dm = MagiDataModule(shards=shards, **OPTIONS)
    lengths = epoch_lengths(dm, EPOCHS)
    loader, stream, states = dm.train_dataloader(), [], [dm.state_dict()]
    for _ in range(EPOCHS):  # outside a Trainer, one data epoch per iter()
        for batch in loader:
            stream.append(dm.on_before_batch_transfer(batch, 0)["key"])
            states.append(dm.state_dict())
    assert len(stream) == sum(lengths)
    for step, state in enumerate(states[:-1]):
        resumed = MagiDataModule(shards=shards, **OPTIONS)
        resumed.setup()
        resumed.load_state_dict(state)
        assert next_keys(resumed) == stream[step], step


def next_keys(dm: MagiDataModule) -> list[str]:
    """Keys of the batch the stream continues with, read off the plan: worker w yields its
    part's batches from `first` on, and the round robin starts at worker 0."""
    epoch, batch = dm.position.next_batch(dm.dataset.batches_in_epoch)
    dm.dataset.prepare_epoch(epoch, batch)
    part = dm.dataset.part(0)
    return [part.rows[item]["key"] for item in part.batches[part.first][1]]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lenient_resume_restarts_the_whole_epoch(shards, tmp_path):
    """data.strict_resume=false restarted the data epoch at batch 0 while Lightning's batch counter
    stayed at k, so Lightning ended that epoch after len - k batches: most of it was skipped."""
    dm = MagiDataModule(shards=shards, **OPTIONS)
    lengths = epoch_lengths(dm, 2)
    stop = lengths[0] + lengths[1] - 2  # two batches before the end of epoch 1
    fit(dm, max_steps=stop, ckpt_out=tmp_path / "mid.ckpt")
    other = {**OPTIONS, "num_workers": 1, "strict_resume": False}
    redo = epoch_lengths(MagiDataModule(shards=shards, **other), 2)[1]
    steps = fit(MagiDataModule(shards=shards, **other), max_steps=stop + redo, ckpt_in=tmp_path / "mid.ckpt")
    assert len(steps) == redo
    keys = Counter(k for step in steps for k in step)
    assert len(keys) == 13 and set(keys.values()) == {1}  # the whole epoch 1, once
