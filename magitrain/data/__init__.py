"""Webdataset shards -> bucketed, rank/worker-split, exactly resumable batches (docs/data.md).

Synthetic clips and latent shards for tests and the demo: `magitrain.data.synthetic` (not imported
here, so that `python -m magitrain.data.synthetic` runs without a double-import warning).
"""

from magitrain.data.buckets import Bucket, parse_buckets
from magitrain.data.datamodule import MagiDataModule
from magitrain.data.dataset import ShardDataset
from magitrain.data.encode import encode_raw_batch
from magitrain.data.quality import BadDataError

__all__ = ["BadDataError", "Bucket", "MagiDataModule", "ShardDataset", "encode_raw_batch", "parse_buckets"]
