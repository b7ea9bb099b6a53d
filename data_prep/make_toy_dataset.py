"""Write the procedurally drawn toy dataset (ImageNet folder layout) used by the embedded demo.

    python data_prep/make_toy_dataset.py --out runs/demo/data/toy [--seed 0] [--image-size 64]

Deterministic from --seed; a second call with the same settings reuses the folder. See
rear_ds/toy/dataset.py for the classes and the layout.
"""
import os
import sys

# data_prep/tokenize.py shadows the stdlib ``tokenize`` module: drop this folder from sys.path first.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
sys.path.insert(0, os.path.dirname(_here))  # the repo root, so rear_ds imports without installing

from rear_ds import cli  # noqa: E402


def main(argv=None) -> int:
    from rear_ds.toy.dataset import ToyDatasetSpec, make_dataset

    d = ToyDatasetSpec()
    p = cli.parser(__doc__, "data_prep/make_toy_dataset.py")
    p.add_argument("--out", required=True, help="dataset root (gets train/, val/, classes.json, dataset.json)")
    p.add_argument("--seed", type=int, default=d.seed, help="drawing seed")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    p.add_argument("--per-class-train", type=int, default=d.per_class_train, help="training images per class")
    p.add_argument("--per-class-val", type=int, default=d.per_class_val, help="held-out images per class")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    spec = ToyDatasetSpec(seed=a.seed, image_size=a.image_size, per_class_train=a.per_class_train,
                          per_class_val=a.per_class_val)
    man, reused = make_dataset(a.out, spec, progress=not a.no_progress)
    n = sum(man["counts"].values()) * man["num_classes"]
    print(f"toy dataset: {'reused' if reused else 'wrote'} {n} images ({man['num_classes']} classes, "
          f"{spec.image_size}x{spec.image_size}) in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
