"""One way to write each kind of output: the sample-grid writer and the atomic JSON writer."""
import ast
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_files(*folders):
    for folder in folders:
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(base, f) for f in files if f.endswith(".py"))


def test_grid_places_every_image_and_pads_white(tmp_path):
    from rear_ds.evaluation.grid import save_grid

    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    path = save_grid(images, str(tmp_path / "sub" / "g.png"), nrow=3, padding=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (6 + 2) + 2, 3 * (4 + 2) + 2, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 2 + r * 8, 2 + c * 6
        assert np.array_equal(grid[y:y + 6, x:x + 4], images[i])  # exact pixels: uint8 in, uint8 out
    assert (grid[:2] == 255).all() and (grid[16:, 14:] == 255).all()  # padding and the empty sixth cell
    assert os.listdir(tmp_path / "sub") == ["g.png"]  # no temporary file left
    with pytest.raises(ValueError, match="uint8 images"):
        save_grid(images.astype(np.float32), str(tmp_path / "f.png"))


def test_one_grid_writer_and_one_json_writer():
    """JSON is written by json.dump in the atomic writer only; a grid writer is defined once."""
    dumps, defs = [], []
    for path in python_files("rear_ds", "bench", "data_prep"):
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dump" \
                    and getattr(node.func.value, "id", "") == "json":
                dumps.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.FunctionDef) and ("grid" in node.name and node.name.startswith(("save", "make"))
                                                      or "json" in node.name and node.name.startswith("write")):
                defs.append(f"{rel}:{node.name}")
    assert [d.split(":")[0] for d in dumps] == ["rear_ds/data/shards.py"], dumps
    assert sorted(defs) == ["rear_ds/data/shards.py:write_json_atomic", "rear_ds/evaluation/grid.py:save_grid"], defs
