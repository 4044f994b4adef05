"""The DataModule over real latent shards with real DataLoader workers: splits, buckets, resume."""

import os
from collections import Counter

import pytest
import torch

from magitrain.data.datamodule import MagiDataModule
from magitrain.data.synthetic import make_latent_dataset

# two latent lengths (1 s and 2 s at 64x128) and a portrait size: three buckets
SHAPES = ((7, 4, 8), (13, 4, 8), (7, 8, 4))
BUCKETS = [
    {"height": 64, "width": 128, "seconds": 1, "batch_size": 3},
    {"height": 64, "width": 128, "seconds": 2, "batch_size": 2},
    {"height": 128, "width": 64, "seconds": 1, "batch_size": 2},
]


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent")
    make_latent_dataset(out, num_samples=30, per_shard=7, latent_shapes=SHAPES, text_dim=16)
    return str(out / "{000000..000004}.tar")


def datamodule(shards, **kw) -> MagiDataModule:
    options = {"mode": "latent", "buckets": BUCKETS, "num_workers": 2, "shuffle_buffer": 4} | kw
    dm = MagiDataModule(shards=shards, **options)
    dm.setup()
    return dm


def run_epoch(dm: MagiDataModule, limit: int | None = None) -> list[dict]:
    """Batches as the training loop sees them (through the DataModule's batch hook)."""
    batches, stream = [], iter(dm.train_dataloader())
    while limit is None or len(batches) < limit:
        batch = next(stream, None)
        if batch is None:
            break
        batches.append(dm.on_before_batch_transfer(batch, 0))
    return batches


def test_two_ranks_two_workers_see_every_sample_once(latent_shards):
    per_rank = [run_epoch(datamodule(latent_shards, rank=r, world_size=2)) for r in range(2)]
    assert (
        len(per_rank[0])
        == len(per_rank[1])
        == datamodule(latent_shards, world_size=2).dataset.batches_in_epoch(0)
    )
    keys = Counter(k for batches in per_rank for b in batches for k in b["key"])
    assert len(keys) == 30 and set(keys.values()) == {1}


def test_batches_follow_the_contract_and_are_homogeneous(latent_shards):
    batches = run_epoch(datamodule(latent_shards, num_workers=0))
    shapes = Counter()
    for b in batches:
        video, audio, text = b["video_latent"], b["audio_latent"], b["text_emb"]
        size, _, t = video.shape[:3]
        assert video.shape[1] == 48 and audio.shape == (size, 4 * (t - 1) + 1, 64)
        assert text.shape[0] == size and text.shape[1] == int(b["text_len"].max()) and text.shape[2] == 16
        for i, n in enumerate(b["text_len"].tolist()):
            assert text[i, n:].abs().sum() == 0 and text[i, n - 1].abs().sum() > 0
        assert len(b["key"]) == len(b["caption"]) == len(b["language"]) == size
        assert "_data" not in b
        shapes[tuple(video.shape[2:])] += size
    assert shapes == {(7, 4, 8): 10, (13, 4, 8): 10, (7, 8, 4): 10}


def test_fewer_shards_than_slots_still_balanced(tmp_path):
    make_latent_dataset(tmp_path, num_samples=9, per_shard=9, latent_shapes=SHAPES[:1], text_dim=8)
    per_rank = [run_epoch(datamodule(str(tmp_path / "000000.tar"), rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(k for batches in per_rank for b in batches for k in b["key"]) == [
        f"000000{i:04d}" for i in range(9)
    ]


def test_order_is_deterministic_and_changes_per_epoch(latent_shards):
    first, second = datamodule(latent_shards), datamodule(latent_shards)
    a0, b0 = run_epoch(first), run_epoch(second)
    assert [b["key"] for b in a0] == [b["key"] for b in b0]
    a1 = run_epoch(first)
    assert [b["key"] for b in a1] != [b["key"] for b in a0]
    assert torch.equal(a0[0]["video_latent"], b0[0]["video_latent"])


@pytest.mark.parametrize("stop_at", [0, 3, 4, 7])
def test_resume_mid_epoch_yields_exactly_the_rest(latent_shards, stop_at):
    reference = datamodule(latent_shards)
    epochs = [[b["key"] for b in run_epoch(reference)] for _ in range(2)]

    interrupted = datamodule(latent_shards)
    run_epoch(interrupted)
    run_epoch(interrupted, limit=stop_at)
    state = interrupted.state_dict()
    n0 = len(epochs[0])
    assert (state["epoch"], state["consumed"]) == (
        (1, stop_at) if stop_at else (0, n0)
    )  # (0, n0): at the end

    resumed = datamodule(latent_shards)
    resumed.load_state_dict(state)
    assert [b["key"] for b in run_epoch(resumed)] == epochs[1][stop_at:]
    assert resumed.state_dict()["epoch"] == 1
    assert [b["key"] for b in run_epoch(resumed)] != epochs[1]  # epoch 2 goes on to a new order


def test_resume_at_every_position_of_a_small_epoch(tmp_path):
    make_latent_dataset(tmp_path, num_samples=11, per_shard=4, latent_shapes=SHAPES, text_dim=8)
    shards = str(tmp_path / "*.tar")
    reference = [b["key"] for b in run_epoch(datamodule(shards, num_workers=3))]
    for stop_at in range(len(reference) + 1):
        interrupted = datamodule(shards, num_workers=3)
        run_epoch(interrupted, limit=stop_at)
        resumed = datamodule(shards, num_workers=3)
        resumed.load_state_dict(interrupted.state_dict())
        rest = [b["key"] for b in run_epoch(resumed)]
        expected = reference[stop_at:] if stop_at < len(reference) else rest  # a full epoch: the next one
        assert rest == expected and len(rest) > 0, stop_at


def test_resume_after_a_complete_epoch_starts_the_next(latent_shards):
    interrupted = datamodule(latent_shards)
    run_epoch(interrupted)
    reference = datamodule(latent_shards)
    run_epoch(reference)
    resumed = datamodule(latent_shards)
    resumed.load_state_dict(interrupted.state_dict())
    assert [b["key"] for b in run_epoch(resumed)] == [b["key"] for b in run_epoch(reference)]


def test_resume_with_other_worker_count_is_refused_or_restarts_the_epoch(latent_shards):
    dm = datamodule(latent_shards)
    run_epoch(dm)
    run_epoch(dm, limit=2)
    other = datamodule(latent_shards, num_workers=1)
    with pytest.raises(ValueError, match="data.num_workers: 2 -> 1"):
        other.load_state_dict(dm.state_dict())
    lenient = datamodule(latent_shards, num_workers=1, strict_resume=False)
    lenient.load_state_dict(dm.state_dict())
    reference = datamodule(latent_shards, num_workers=1)
    run_epoch(reference)
    assert [b["key"] for b in run_epoch(lenient)] == [b["key"] for b in run_epoch(reference)]
    assert lenient.state_dict()["epoch"] == 1


def test_mixture_weights(tmp_path):
    # dataset a holds 1 s latents, b 2 s latents, so the batch shape tells the source
    make_latent_dataset(tmp_path / "a", num_samples=6, per_shard=3, latent_shapes=SHAPES[:1], text_dim=8)
    make_latent_dataset(tmp_path / "b", num_samples=8, per_shard=4, latent_shapes=SHAPES[1:2], text_dim=8)
    dm = datamodule(
        None,
        num_workers=0,
        datasets=[
            {"name": "a", "shards": str(tmp_path / "a" / "*.tar"), "weight": 2.0},
            {"name": "b", "shards": str(tmp_path / "b" / "*.tar"), "weight": 0.5},
        ],
    )
    per_source = {7: Counter(), 13: Counter()}
    for b in run_epoch(dm):
        per_source[b["video_latent"].shape[2]].update(b["key"])
    assert len(per_source[7]) == 6 and set(per_source[7].values()) == {2}  # weight 2: every sample twice
    assert sum(per_source[13].values()) == 4 and set(per_source[13].values()) == {1}  # weight 0.5: half


@pytest.mark.parametrize("group", ["latent", "raw", "demo"])
def test_hydra_data_configs_instantiate(latent_shards, group):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(
            config_name="train",
            overrides=[
                f"data={group}",
                f"data.shards='{latent_shards}'",
                "data.num_workers=0",
                "data.buckets=[{height: 64, width: 128, seconds: 1, batch_size: 2}]",
            ],
        )
    dm = instantiate(cfg.data)
    assert isinstance(dm, MagiDataModule) and dm.mode == ("latent" if group == "latent" else "raw")
    if group == "latent":
        assert next(iter(dm.train_dataloader()))["video_latent"].shape == (2, 48, 7, 4, 8)


def test_worker_batch_buffers_are_reused_but_never_under_a_held_batch(latent_shards):
    """Workers write batches into shared buffers they reuse (collate.SharedRing): a batch the main
    process still holds keeps its buffer; dropped batches give theirs back."""
    import gc

    def rows(batch):
        for i, key in enumerate(batch["key"]):
            n = int(batch["text_len"][i])
            yield key, (batch["video_latent"][i], batch["audio_latent"][i], batch["text_emb"][i, :n])

    reference = {k: v for b in run_epoch(datamodule(latent_shards, num_workers=0)) for k, v in rows(b)}
    dm = datamodule(latent_shards, num_workers=2)
    held = run_epoch(dm)  # every batch of the epoch kept alive until the end
    held_keys = [b["key"] for b in held]
    got = {k: v for b in held for k, v in rows(b)}
    assert got.keys() == reference.keys()
    for key, tensors in got.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, reference[key], strict=True)), key
    counts = dm.dataset.ring_counts
    assert counts[:, 0].sum() > 0 and counts[:, 0].sum() > counts[:, 1].sum()  # lent from the ring
    del held, got, tensors
    gc.collect()
    assert torch.equal(counts[:, 0], counts[:, 1])  # all given back
    for _ in dm.train_dataloader():  # dropped at once: the slots are reused
        pass
    gc.collect()
    assert counts[:, 0].sum() >= 2 * len(held_keys) - 2 * dm.dataset.ring_slots


def test_resume_refuses_a_changed_plan_naming_the_field(latent_shards, tmp_path):
    """A resume checked only seed, world size and workers: with bucket batch size 2 -> 5 it went on
    at the old position of a different plan (of 40 samples, 2 seen twice and 11 never)."""
    dm = datamodule(latent_shards, num_workers=0)
    run_epoch(dm, limit=2)
    state = dm.state_dict()
    bigger = [BUCKETS[0], {**BUCKETS[1], "batch_size": 5}, BUCKETS[2]]
    fewer = latent_shards.replace("000004", "000003")
    changes = {
        "data.buckets: .*64x128x49f batch_size=2.* -> .*64x128x49f batch_size=5": {"buckets": bigger},
        "data.shuffle_buffer: 4 -> 8": {"shuffle_buffer": 8},
        "data.shuffle: True -> False": {"shuffle": False},
        "data.shards: 5 shards.* -> 4 shards": {"shards": fewer},
        "data.datasets: .*weight=1.0.* -> .*weight=2.0": {
            "shards": None,
            "datasets": [{"shards": latent_shards, "weight": 2.0, "name": "default"}],
        },
    }
    for field, change in changes.items():
        options = {"shards": latent_shards, "num_workers": 0} | change
        with pytest.raises(ValueError, match=field):
            datamodule(**options).load_state_dict(state)
    lenient = datamodule(latent_shards, num_workers=0, buckets=bigger, strict_resume=False)
    lenient.load_state_dict(state)  # restarts the saved epoch
    assert (lenient.position.epoch, lenient.position.consumed) == (0, 0)
    same = datamodule(latent_shards, num_workers=0)
    same.load_state_dict(state)
    assert (same.position.epoch, same.position.consumed) == (0, 2)


def bytes_read() -> int:
    """Bytes this process has read with read() calls so far (Linux's /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_a_shared_shard_is_read_only_for_the_slots_samples(tmp_path):
    """Slots sharing a shard each read it whole: rank 1 of 2 read 124 of 124 kB to train its 8 of
    16 samples. It now seeks to its first sample (the index's offsets) and stops after its last."""
    make_latent_dataset(tmp_path, num_samples=16, per_shard=16, latent_shapes=SHAPES[:1], text_dim=8)
    shard = tmp_path / "000000.tar"
    size = shard.stat().st_size
    for rank in (0, 1):
        dm = datamodule(str(shard), rank=rank, world_size=2, num_workers=0)
        run_epoch(datamodule(str(shard), num_workers=0))  # imports and first-use reads before counting
        before = bytes_read()
        batches = run_epoch(dm)
        read = bytes_read() - before
        assert sum(len(b["key"]) for b in batches) == 8
        assert size * 0.45 < read < size * 0.55, (rank, read, size)
