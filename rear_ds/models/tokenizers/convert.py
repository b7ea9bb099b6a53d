"""Convert tokenizer weights to safetensors: ``python -m rear_ds.models.tokenizers.convert IN.bin OUT.safetensors``.

The input is read safely (``torch.load(weights_only=True)``, never unpickling code) and, unless
``--no-check`` is given, strictly checked against the released layout of ``--tokenizer`` (MaskGIT-VQGAN:
168 tensors; ``--tokenizer alitok``: AliTok.pth, 456 tensors) before anything is written. The output
records the source file name and SHA-256 in its metadata.
"""
from __future__ import annotations

import os
import sys

import torch

from rear_ds import cli
from rear_ds.models.tokenizers import IMPLEMENTATIONS, released_config, tokenizer_weights_sha256
from rear_ds.models.weights import WeightsError, check_state_dict, read_state_dict, save_safetensors


def main(argv=None) -> int:
    parser = cli.parser(__doc__, "python -m rear_ds.models.tokenizers.convert")
    parser.add_argument("src", help="tokenizer weights (.bin/.pt/.pth state dict or .safetensors)")
    parser.add_argument("dst", help="output .safetensors path")
    parser.add_argument("--tokenizer", default="maskgit_vqgan", choices=sorted(IMPLEMENTATIONS),
                        help="whose released layout the file is checked against (default maskgit_vqgan)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the strict check against the released layout (e.g. toy weights)")
    args = parser.parse_args(argv)
    try:
        state = read_state_dict(args.src)
        if not args.no_check:
            with torch.device("meta"):  # keys and shapes only: no memory for a second copy
                cfg = released_config(args.tokenizer)
                model = IMPLEMENTATIONS[cfg.family](cfg)
            check_state_dict(model, state, what=f"tokenizer weights {args.src!r}", expected=model.arch)
        src_sha = tokenizer_weights_sha256(args.src)
        save_safetensors(state, args.dst, metadata={"source": os.path.basename(args.src), "source_sha256": src_sha})
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters\n"
          f"  source sha256 {src_sha}\n  output sha256 {tokenizer_weights_sha256(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
