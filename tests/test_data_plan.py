"""The epoch plan from metadata alone: splits, equal counts, determinism, mixing weights, buckets."""

from collections import Counter

import pytest

from magitrain.data.buckets import Bucket, assign_latent, assign_raw, frames_for_seconds, parse_buckets
from magitrain.data.plan import EpochPlanner, equalise

BUCKETS = (Bucket(64, 128, 25, 3), Bucket(64, 128, 49, 2), Bucket(128, 64, 25, 4))


def planner(shard_sizes, weights=(1.0,), shard_dataset=None, **kw) -> EpochPlanner:
    # bucket of row r in shard s cycles through the three buckets, with some -1 (unbucketed)
    shard_buckets = tuple(tuple((s + r) % 4 - 1 for r in range(n)) for s, n in enumerate(shard_sizes))
    return EpochPlanner(shard_buckets, shard_dataset or (0,) * len(shard_sizes), weights, BUCKETS, **kw)


def all_batches(p: EpochPlanner, epoch: int, ranks: int, workers: int):
    slots = ranks * workers
    return [p.slot_batches(epoch, s, slots)[1] for s in range(slots)]


@pytest.mark.parametrize("sizes", [[10, 7, 13, 5, 9], [3], [40], [2, 1]])
def test_every_sample_once_and_equal_batch_counts(sizes):
    p = planner(sizes)
    per_slot = all_batches(p, 0, ranks=2, workers=2)
    assert len({len(b) for b in per_slot}) == 1
    seen = Counter(item for batches in per_slot for _, items in batches for item in items)
    eligible = {(s, r) for s, n in enumerate(sizes) for r in range(n) if p.shard_buckets[s][r] >= 0}
    if len(eligible) >= 4:  # fewer samples than slots must repeat some; otherwise exactly once
        assert seen == Counter(eligible)
    for batches in per_slot:
        for bucket, items in batches:
            assert {p.shard_buckets[s][r] for s, r in items} == {bucket}
            assert 1 <= len(items) <= BUCKETS[bucket].batch_size


def test_plan_is_deterministic_per_seed_and_epoch():
    p = planner([10, 7, 13, 5, 9], shuffle_buffer=8)
    assert all_batches(p, 3, 2, 2) == all_batches(planner([10, 7, 13, 5, 9], shuffle_buffer=8), 3, 2, 2)
    assert all_batches(p, 3, 2, 2) != all_batches(p, 4, 2, 2)
    other_seed = planner([10, 7, 13, 5, 9], shuffle_buffer=8, seed=1)
    assert all_batches(p, 3, 2, 2) != all_batches(other_seed, 3, 2, 2)
    unshuffled = planner([10, 7, 13, 5, 9], shuffle=False)
    assert unshuffled.stream(0) == unshuffled.stream(1)


def test_mixing_weights_set_samples_per_epoch():
    # dataset 0: shards 0, 1 (weight 2: every sample twice); dataset 1: shard 2 (weight 0.5: half)
    p = planner([8, 8, 16], weights=(2.0, 0.5), shard_dataset=(0, 0, 1))
    counts = Counter(p.stream(0))
    eligible = lambda s: sum(b >= 0 for b in p.shard_buckets[s])  # noqa: E731
    assert sum(n for (s, _), n in counts.items() if s < 2) == 2 * (eligible(0) + eligible(1))
    assert all(n == 2 for (s, _), n in counts.items() if s < 2)
    assert sum(n for (s, _), n in counts.items() if s == 2) == round(0.5 * eligible(2))


def test_equalise_splits_before_it_repeats():
    batches = [(0, [(0, 0), (0, 1), (0, 2)]), (1, [(0, 3)])]
    out = equalise(batches, 4)
    assert len(out) == 4 and sorted(i for _, items in out for i in items) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert len(equalise([(0, [(0, 0)])], 3)) == 3  # nothing to split: repeats


def test_bucket_arithmetic_and_assignment():
    assert frames_for_seconds(5) == 125 and frames_for_seconds(2) == 49 and frames_for_seconds(1) == 25
    b = Bucket(256, 448, 125, 1)
    assert (
        b.latent_shape == (32, 16, 28) and b.audio_samples(51200) == 125 * 2048
    )  # F/25 s: one audio step per frame
    buckets = parse_buckets(
        [
            {"height": 256, "width": 448, "seconds": 2, "batch_size": 4},
            {"height": 256, "width": 448, "seconds": 5, "batch_size": 2},
            {"height": 448, "width": 256, "seconds": 2, "batch_size": 4},
        ]
    )
    # the last argument is the usable span in 25 fps frames
    assert assign_raw(buckets, 1280, 720, 175) == 1  # landscape, long enough for 5 s
    assert assign_raw(buckets, 1280, 720, 125) == 1 and assign_raw(buckets, 1280, 720, 124) == 0
    assert assign_raw(buckets, 720, 1280, 225) == 2  # portrait
    assert assign_raw(buckets, 1280, 720, 25) == -1  # too short for any bucket
    assert assign_latent(buckets, (40, 16, 28)) == 1 and assign_latent(buckets, (10, 9, 9)) == -1
    with pytest.raises(ValueError, match=r"data.buckets\[0\].*multiples of 16"):
        parse_buckets([{"height": 250, "width": 448, "seconds": 2, "batch_size": 1}])
    with pytest.raises(ValueError, match="missing field"):
        parse_buckets([{"height": 256, "width": 448, "batch_size": 1}])


def test_span_policies_from_the_index_alone():
    from magitrain.data.span import AVPolicy, Unplanned, clip_span

    short = {"duration": 3.0, "has_audio": True, "audio_start": 0.0, "audio_duration": 1.4}
    late = {"duration": 2.4, "has_audio": True, "audio_start": 0.45, "audio_duration": 1.55}
    long = {"duration": 1.6, "has_audio": True, "audio_start": -0.2, "audio_duration": 2.4}
    crop = AVPolicy()
    assert (clip_span(short, crop).first, clip_span(short, crop).frames) == (0, 35)
    assert (clip_span(late, crop).first, clip_span(late, crop).frames) == (12, 38)  # 0.48 s to 2.0 s
    assert (clip_span(long, crop).first, clip_span(long, crop).frames) == (0, 40)  # the extra audio is cut
    pad = AVPolicy("pad_silence", 1.0)
    assert clip_span(late, pad).frames == 60 and clip_span(short, pad).frames == 35  # 1.6 s > 1.0 s: crop
    drop = AVPolicy("drop", 0.5)
    with pytest.raises(Unplanned, match="av_mismatch"):
        clip_span(short, drop)
    with pytest.raises(Unplanned, match="av_mismatch"):
        clip_span(long, drop)  # 0.8 s of audio beyond the video
    assert clip_span({**short, "audio_duration": 2.8}, drop).frames == 70
    silent = {"duration": 2.0, "has_audio": False}
    assert clip_span(silent, crop) == clip_span(silent, AVPolicy(missing_audio="silence"))
    assert not clip_span(silent, crop).has_audio and clip_span(silent, crop).frames == 50
    with pytest.raises(Unplanned, match="missing_audio"):
        clip_span(silent, AVPolicy(missing_audio="drop"))
    with pytest.raises(Unplanned, match="too_short"):
        clip_span({**late, "audio_start": 2.5}, crop)  # no overlap at all
    assert clip_span({"duration": 2.0}, crop).frames == 50  # a version-1 index row: audio = video
    with pytest.raises(ValueError, match="data.av_mismatch"):
        AVPolicy("stretch")


def test_a_clip_goes_to_the_longest_bucket_its_common_span_fills():
    from magitrain.data.span import AVPolicy, clip_span

    buckets = parse_buckets([{"height": 256, "width": 448, "seconds": s, "batch_size": 1} for s in (1, 2, 5)])
    row = {"duration": 6.0, "width": 1280, "height": 720, "has_audio": True, "audio_duration": 2.5}
    assert assign_raw(buckets, 1280, 720, round(row["duration"] * 25)) == 2  # what the video suggests
    assert (
        assign_raw(buckets, 1280, 720, clip_span(row, AVPolicy()).frames) == 1
    )  # 2 s: the audio ends at 2.5 s
