"""Train (or reuse) the small "toy_vq" tokenizer on the toy dataset and report its held-out PSNR.

    python data_prep/train_toy_tokenizer.py --data runs/demo/data/toy --out runs/demo/tokenizer \\
        [--config configs/toy.yaml]

Writes <out>/toy_vq.safetensors and <out>/toy_vq.json (cache key, PSNR on the val split, codebook
usage). The architecture comes from the ``tokenizer:`` section of --config; the VQ training settings
are rear_ds.toy.tokenizer_training.VQTrainConfig (flags below). Same config + same data = reused.
"""
import os
import sys

# data_prep/tokenize.py shadows the stdlib ``tokenize`` module: drop this folder from sys.path first.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
sys.path.insert(0, os.path.dirname(_here))  # the repo root, so rear_ds imports without installing

from rear_ds import cli  # noqa: E402


def main(argv=None) -> int:
    import torch

    from rear_ds.config import load_config
    from rear_ds.toy.tokenizer_training import VQTrainConfig, ensure_tokenizer

    d = VQTrainConfig()
    p = cli.parser(__doc__, "data_prep/train_toy_tokenizer.py")
    p.add_argument("--data", required=True, help="toy dataset root (from data_prep/make_toy_dataset.py)")
    p.add_argument("--out", required=True, help="folder for toy_vq.safetensors and toy_vq.json")
    p.add_argument("--config", default="configs/toy.yaml", help="YAML whose tokenizer: section is used")
    p.add_argument("--steps", type=int, default=d.steps, help="VQ training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation and batch-order seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--retrain", action="store_true",
                   help="train even when the weights shipped in data_prep/toy_tokenizer/ match these settings")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config).tokenizer
    tcfg = VQTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    weights, rep = ensure_tokenizer(cfg, a.data, a.out, tcfg, progress=not a.no_progress, use_shipped=not a.retrain)
    how = "reused" if rep["reused"] else ("shipped" if rep.get("shipped") else "trained")
    print(f"toy tokenizer: {how} {weights} "
          f"(grid {cfg.grid[0]}x{cfg.grid[1]}, codebook {cfg.codebook_size}; held-out PSNR "
          f"{rep['val_psnr_db']:.2f} dB, codebook usage {rep['val_codebook_usage']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
