"""CLI: convert the reference's pretokenized JSONL into rear_ds token shards + manifest.json.

    python -m rear_ds.data.jsonl_to_shards pretokenized.jsonl /data/tok/rar_tencrop \\
        --grid 16 16 --codebook-size 1024 --views ten-crop
"""
from __future__ import annotations

import sys

from rear_ds import cli

from .jsonl import convert
from .shards import ShardError


def main(argv=None) -> int:
    p = cli.parser(__doc__, "python -m rear_ds.data.jsonl_to_shards")
    p.add_argument("jsonl", help='input file, one {"class_id": int, "tokens": [ints]} per line')
    p.add_argument("out", help="empty output folder")
    p.add_argument("--grid", type=int, nargs=2, default=[16, 16], metavar=("H", "W"), help="token grid (default 16 16)")
    p.add_argument("--codebook-size", type=int, default=1024, help="tokenizer codebook size (default 1024)")
    p.add_argument("--num-classes", type=int, default=1000, help="class ids must lie in [0, N); lines outside "
                   "are skipped and listed (default 1000)")
    p.add_argument("--samples-per-shard", type=int, default=200_000, help="samples per shard (default 200000, ~0.9 GB)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="line permutation seed (-1 = file order)")
    p.add_argument("--tokenizer-name", default="maskgit_vqgan", help="recorded in the manifest")
    p.add_argument("--views", default="unknown", help="recorded in the manifest (RAR's file: ten-crop)")
    a = p.parse_args(argv)
    if a.codebook_size > 65536:
        p.error(f"--codebook-size {a.codebook_size} does not fit uint16 shards")
    if a.num_classes < 1:
        p.error(f"--num-classes {a.num_classes}: expected a positive number")
    try:
        convert(a.jsonl, a.out, tuple(a.grid), a.codebook_size, a.samples_per_shard, a.shuffle_seed,
                a.tokenizer_name, a.views, a.num_classes)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
