"""Safe weights I/O: reading, strict loading, atomic safetensors writing, refusing pickled code."""
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

from rear_ds.models.weights import (WeightsError, check_state_dict, load_strict, read_state_dict,
                                    save_safetensors)


class Evil:
    """Unpickling this would call open(marker, "w"), i.e. run code chosen by the file's author."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))


def test_safetensors_round_trip_with_metadata(tmp_path):
    sd = {"a": torch.randn(2, 3), "b": torch.arange(5), "c": torch.randn(4, 4).t()}  # c is non-contiguous
    path = tmp_path / "sub" / "w.safetensors"
    save_safetensors(sd, str(path), metadata={"note": "x"})
    back = read_state_dict(str(path))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "x"}
    assert os.listdir(path.parent) == ["w.safetensors"]  # no temp file left behind


def test_save_safetensors_handles_tied_tensors(tmp_path):
    w = torch.randn(3, 3)
    save_safetensors({"emb": w, "head": w}, str(tmp_path / "t.safetensors"))
    back = read_state_dict(str(tmp_path / "t.safetensors"))
    assert torch.equal(back["emb"], w) and torch.equal(back["head"], w)


def test_reads_torch_bin(tmp_path):
    sd = _net().state_dict()
    torch.save(sd, tmp_path / "w.bin")
    back = read_state_dict(str(tmp_path / "w.bin"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = {"weight": torch.zeros(2), "trap": Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(WeightsError, match="refused") as err:
        read_state_dict(str(path))
    assert str(path) in str(err.value) and "Unsupported global" in str(err.value)
    assert not marker.exists()


def test_missing_file_and_bad_formats(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as err:
        read_state_dict(str(tmp_path / "nope.bin"))
    assert "nope.bin" in str(err.value)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format"):
        read_state_dict(str(tmp_path / "w.npz"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        read_state_dict(str(tmp_path / "junk.safetensors"))
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.bin' is not a readable torch weights file"):
        read_state_dict(str(tmp_path / "junk.bin"))


def test_nested_checkpoint_is_not_a_state_dict(tmp_path):
    torch.save({"model": _net().state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match="not a flat state dict") as err:
        read_state_dict(str(tmp_path / "ckpt.pt"))
    assert "model" in str(err.value)


def test_load_strict_loads_exact_match():
    src, dst = _net(), _net()
    load_strict(dst, src.state_dict(), what="w.bin")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_load_strict_names_missing_unexpected_and_wrong_shape_keys():
    net = _net()
    good = net.state_dict()
    cases = {
        "missing 1 keys: 0.bias": {k: v for k, v in good.items() if k != "0.bias"},
        "unexpected 1 keys: 3.weight": {**good, "3.weight": torch.zeros(1)},
        "wrong shape for 1 keys: 2.weight (file [2, 5] vs model [2, 4])": {**good, "2.weight": torch.zeros(2, 5)},
    }
    for needle, sd in cases.items():
        with pytest.raises(WeightsError) as err:
            load_strict(net, sd, what="file 'w.bin'", expected="model.depth=2")
        msg = str(err.value)
        assert needle in msg and "file 'w.bin'" in msg and "model.depth=2" in msg


def test_load_strict_lists_a_few_and_counts_the_rest():
    sd = {f"extra.{i}": torch.zeros(1) for i in range(12)}
    with pytest.raises(WeightsError, match=r"unexpected 12 keys: extra\.0, .* and 7 more"):
        check_state_dict(nn.Identity(), sd, what="w.bin")


def test_optional_prefixes_may_be_absent_on_either_side():
    net = nn.ModuleDict({"body": nn.Linear(2, 2), "head": nn.Linear(2, 1)})
    body_only = {k: v for k, v in net.state_dict().items() if k.startswith("body.")}
    result = load_strict(net, body_only, what="w", optional_prefixes=("head.",))
    assert result.missing_optional == ["head.weight", "head.bias"]
    extra = {**net.state_dict(), "head2.weight": torch.zeros(1)}
    result = load_strict(net, extra, what="w", optional_prefixes=("head2.",))
    assert result.ignored_optional == ["head2.weight"]


def test_weights_sha256_ignores_safetensors_header_order(tmp_path):
    """Two exports of the same weights may order the header differently; their content hash must agree."""
    import hashlib
    import json
    import struct

    from rear_ds.models.weights import save_safetensors, weights_sha256

    a = str(tmp_path / "a.safetensors")
    save_safetensors({"x": torch.arange(4.0), "y": torch.ones(2, 3)}, a, metadata={"k1": "v1", "k2": "v2"})
    raw = open(a, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    reordered = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    reordered += b" " * (n - len(reordered))  # keep the data offset
    b = str(tmp_path / "b.safetensors")
    open(b, "wb").write(raw[:8] + reordered + raw[8 + n:])
    assert hashlib.sha256(open(a, "rb").read()).hexdigest() != hashlib.sha256(open(b, "rb").read()).hexdigest()
    assert weights_sha256(a) == weights_sha256(b)
    torch.save({"x": torch.ones(1)}, tmp_path / "c.bin")
    assert weights_sha256(str(tmp_path / "c.bin")) == hashlib.sha256(open(tmp_path / "c.bin", "rb").read()).hexdigest()
