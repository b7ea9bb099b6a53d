"""Pre-tokenize ImageNet into WebDataset token shards. See --help and rear_ds/data/tokenize_job.py.

This file is named tokenize.py, which shadows the stdlib ``tokenize`` module (imported indirectly by
torch, inspect, linecache ...) when run as a script: drop this folder from sys.path before any import.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
sys.path.insert(0, os.path.dirname(_here))  # the repo root, so rear_ds imports without installing

from rear_ds.data.tokenize_job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
