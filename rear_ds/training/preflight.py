"""Checks that must fail before any model is built or any data is read, each naming the key or file."""
from __future__ import annotations

import glob
import os

from rear_ds.config import Config, ConfigError


def check_paths(cfg: Config) -> None:
    """Data and tokenizer files exist (cfg.validate(need_data=True) has already checked the keys)."""
    d = cfg.data
    if d.jsonl and not os.path.isfile(d.jsonl):
        raise ConfigError(f"data.jsonl={d.jsonl!r}: file does not exist")
    if d.shards:
        if "{" in d.shards or d.shards.endswith(".tar"):
            first = d.shards.split("{")[0]
            if not (glob.glob(first + "*") or os.path.exists(d.shards)):
                raise ConfigError(f"data.shards={d.shards!r}: no shard files match")
        elif not os.path.isdir(d.shards):
            raise ConfigError(f"data.shards={d.shards!r}: folder does not exist")
        elif not os.path.isfile(os.path.join(d.shards, "manifest.json")):
            raise ConfigError(f"data.shards={d.shards!r}: no manifest.json in that folder")
    t = cfg.tokenizer
    if t.weights and not os.path.isfile(t.weights):
        raise ConfigError(f"tokenizer.weights={t.weights!r}: file does not exist")
    if not t.weights and not cfg.train.allow_random_tokenizer:
        raise ConfigError("tokenizer.weights is not set: training needs the tokenizer's codebook (the alignment "
                          "targets). Set tokenizer.weights=/path/to/weights, or for tests and toy runs only, "
                          "train.allow_random_tokenizer=true to use a randomly initialised codebook.")
