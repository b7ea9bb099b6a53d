"""The toy dataset generator behind the embedded demo: deterministic, ImageNet layout, distinct classes."""
import json
import os

import numpy as np

from rear_ds.toy.dataset import (NUM_CLASSES, WNIDS, ToyDatasetSpec, draw_image, image_rng, load_split,
                                 make_dataset)


def test_same_seed_same_pixels_and_images_vary():
    a = draw_image(3, image_rng(0, "train", 3, 7), 64)
    b = draw_image(3, image_rng(0, "train", 3, 7), 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    # another index, split or seed -> another image of the class (position / size / shade vary)
    for rng in (image_rng(0, "train", 3, 8), image_rng(0, "val", 3, 7), image_rng(1, "train", 3, 7)):
        assert not np.array_equal(a, draw_image(3, rng, 64))


def _fg_colour(img: np.ndarray) -> np.ndarray:
    """Mean colour of the pixels that differ clearly from the (flat) background, read at a corner."""
    x = img.astype(np.float64)
    d = np.abs(x - x[0, 0]).sum(-1)
    return x[d >= 0.5 * d.max()].mean(0)


def test_classes_differ_more_than_images_within_a_class():
    cols = np.array([[_fg_colour(draw_image(c, image_rng(0, "train", c, i), 64)) for i in range(6)]
                     for c in range(NUM_CLASSES)])  # (C, 6, 3)
    centroids = cols.mean(1)
    # nearest-centroid on the foreground colour alone already separates the classes
    dist = np.linalg.norm(cols[:, :, None, :] - centroids[None, None], axis=-1)  # (C, 6, C)
    assert (dist.argmin(-1) == np.arange(NUM_CLASSES)[:, None]).mean() >= 0.9
    # and the foreground area (size / position vary inside a class) is not constant
    areas = [(np.abs(draw_image(0, image_rng(0, "train", 0, i), 64).astype(int)
                     - draw_image(0, image_rng(0, "train", 0, i), 64)[0, 0]).sum(-1) > 60).mean() for i in range(6)]
    assert np.std(areas) > 0.01


def test_folder_layout_manifest_and_reuse(tmp_path):
    root = str(tmp_path / "toy")
    spec = ToyDatasetSpec(seed=0, image_size=32, per_class_train=2, per_class_val=1)
    man, reused = make_dataset(root, spec, progress=False)
    assert not reused
    assert sorted(os.listdir(os.path.join(root, "train"))) == WNIDS
    assert len(os.listdir(os.path.join(root, "val", WNIDS[0]))) == 1
    assert json.load(open(os.path.join(root, "classes.json")))[0]["wnid"] == WNIDS[0]
    man2, reused2 = make_dataset(root, spec, progress=False)
    assert reused2 and man2["pixels_sha256"] == man["pixels_sha256"]
    # a different seed is a different dataset (and is redrawn, not reused)
    man3, reused3 = make_dataset(root, ToyDatasetSpec(seed=1, image_size=32, per_class_train=2, per_class_val=1),
                                 progress=False)
    assert not reused3 and man3["pixels_sha256"] != man["pixels_sha256"]
    x, y = load_split(root, "train", 16)
    assert x.shape == (2 * NUM_CLASSES, 16, 16, 3) and list(y[:3]) == [0, 0, 1]


def test_shipped_toy_tokenizer_matches_the_toy_config():
    """The shipped weights are used only when their cache key equals the one computed for configs/toy.yaml: a
    config field that the toy VQ does not use (a new tokenizer family's knobs) must not change it, else every demo,
    ablation and test quietly retrains the tokenizer (86 s each)."""
    from rear_ds.config import load_config
    from rear_ds.toy.tokenizer_training import SHIPPED_DIR, VQTrainConfig, cache_key, read_report

    shipped = read_report(SHIPPED_DIR)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "toy.yaml"))
    assert cache_key(cfg.tokenizer, VQTrainConfig(), shipped["data_sha256"]) == shipped["cache_key"]
