"""Webdataset shards -> bucketed, rank/worker-split, exactly resumable batches (docs/data.md)."""

from magitrain.data.buckets import Bucket, parse_buckets
from magitrain.data.datamodule import MagiDataModule
from magitrain.data.dataset import ShardDataset
from magitrain.data.encode import encode_raw_batch
from magitrain.data.quality import BadDataError
from magitrain.data.synthetic import make_demo_dataset, make_latent_dataset

__all__ = [
    "BadDataError", "Bucket", "MagiDataModule", "ShardDataset", "encode_raw_batch", "make_demo_dataset",
    "make_latent_dataset", "parse_buckets",
]  # fmt: skip
