"""Data: ImageNet pre-tokenization into WebDataset token shards, and the training reader.

- preprocess.py   ADM center crop, views (center / center+flip / ten-crop), RGB conversion
- sources.py      inputs: ImageNet-style folders and WebDataset image shards
- shards.py       the token shard format, atomic shard writer, manifest I/O
- tokenize_job.py the (multi-rank, resumable) tokenization job behind data_prep/tokenize.py
- reader.py       build_train_loader(...): the resumable training stream
- jsonl.py        the reference's pretokenized JSONL: reader and JSONL -> shards converter
- bench.py        throughput helpers for the benchmark suite
"""
from .reader import build_train_loader  # noqa: F401
