#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine (Python 3.11, no GPU) and run it.
# The Slurm tests install and start their own single-node cluster (tests/slurm_cluster.sh, needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[test]"
python -m pytest -q --durations=30 tests "$@"
