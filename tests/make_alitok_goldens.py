"""Make the AliTok golden tensors in tests/golden/ from the OFFICIAL code (run once; tests never need it).

Needs a checkout of github.com/ali-vilab/alitok at commit 093e957 OUTSIDE this project (it has no license: it is
run here, never copied), e.g.

    git --git-dir=<mirror of ali-vilab/alitok> archive 093e957 | tar -x -C /tmp/alitok
    PYTHONPATH=$PWD python tests/make_alitok_goldens.py --alitok /tmp/alitok

and torch, torchvision, einops, PIL. Everything runs on the CPU in fp32. Writes

  tests/golden/alitok_parity.npz     full released layout (456 keys) with random weights (tests/alitok_reference.py):
                                     encoder latents z of two images, their ids, and the decoder's output for the
                                     first image's ids (uint16, value * 65535, rounded)
  tests/golden/alitok_tencrop.npz    the official pretokenization.py (--ten_crop) run unchanged on an
                                     ImageNet-style folder of 6 images of several sizes and modes, with the
                                     released widths at one block per tower: per image the sha256 of each of
                                     the 10 views' pixels, the (10, 273) codes it saved, and which of them are
                                     clear of near-ties (gap > 1e-3 between the two nearest codes)
  tests/golden/alitok_goldens.json   seeds, codebook scales, near-tie margins, weight checksums, versions

The tests rebuild the same weights and images from the seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import alitok_reference as R  # noqa: E402

COMMIT = "093e957"
MIN_MARGIN = 1e-3  # a clear id: its nearest and second-nearest squared distances differ by more than this


def official_model(depth: dict = None):
    from modeling.alitok import AliTok

    model = AliTok()
    for part, n in (depth or {}).items():  # e.g. {"encoder": 1}: keep the first n blocks (the loop runs num_layers)
        tower = getattr(model, part)
        tower.transformer = tower.transformer[:n]
        tower.num_layers = n
    return model.eval()


def encode_latents(model, x: torch.Tensor) -> torch.Tensor:
    """The official encoder's z (B, 32, 1, 273) as (B, 273, 32)."""
    with torch.no_grad():
        z = model.encoder(x, model.latent_tokens)
    return z[:, :, 0, :].permute(0, 2, 1).contiguous()


def calibrated_state(model, seed: int, x: torch.Tensor) -> tuple:
    """Random weights whose codebook rows have the scale of the latents of ``x``."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(R.random_state(shapes, seed, 1.0), strict=True)
    scale = round(float(encode_latents(model, x).std()), 3)
    state = R.random_state(shapes, seed, scale)
    model.load_state_dict(state, strict=True)
    return state, scale


def parity(out: dict, meta: dict) -> None:
    model = official_model()
    x = R.parity_images()
    state, scale = calibrated_state(model, R.PARITY_SEED, x)
    z = encode_latents(model, x)
    with torch.no_grad():
        _, res = model.encode(x, model.latent_tokens)
        ids = res["min_encoding_indices"].reshape(x.shape[0], -1)
        decoded = model.decode_tokens(ids[:1])
    margin = float(R.nearest_gaps(z, model.quantize.embedding.weight).min())
    assert margin > MIN_MARGIN, f"near-tie in the parity draw (margin {margin}): change PARITY_SEED"
    assert 0 < float(decoded.min()) and float(decoded.max()) < 1
    out.update(parity_z=z.numpy().astype(np.float32), parity_ids=ids.numpy().astype(np.int16),
               parity_decoded_u16=np.round(decoded[0].numpy().astype(np.float64) * 65535).astype(np.uint16))
    meta["parity"] = {"seed": R.PARITY_SEED, "codebook_scale": scale, "nearest_margin": margin,
                      "unique_ids": int(ids.unique().numel()), "state_checksum": R.state_checksum(state),
                      "num_keys": len(state), "num_params": sum(t.numel() for t in state.values()),
                      "decoded_range": [float(decoded.min()), float(decoded.max())]}
    print(f"parity: {len(state)} keys, codebook scale {scale}, margin {margin:.4g}, {meta['parity']['unique_ids']} ids")


def tencrop(out: dict, meta: dict) -> None:
    import pretokenization
    import modeling.alitok

    depth = {"encoder": R.TENCROP_ARCH["encoder_depth"], "decoder": R.TENCROP_ARCH["decoder_depth"]}
    model = official_model(depth)
    seen = []  # the pixels the official loop hands to the encoder, batch by batch

    def encode(samples, latent_tokens):
        seen.append(samples.clone())
        return type(model).encode(model, samples, latent_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        images = R.tencrop_images()
        R.write_folder(os.path.join(tmp, "data", "train"), images)
        # Calibrate the codebook on the centre views as the official transform makes them.
        from PIL import Image
        probe = torch.stack([torch.from_numpy(np.asarray(pretokenization.center_crop_arr(
            Image.open(io.BytesIO(b)).convert("RGB"), 256))).permute(2, 0, 1).float() / 255 for b in images.values()])
        state, scale = calibrated_state(model, R.TENCROP_SEED, probe)
        model.encode = encode
        args = pretokenization.get_args_parser().parse_args(
            ["--data_path", os.path.join(tmp, "data"), "--cached_path", os.path.join(tmp, "cache"), "--ten_crop",
             "--device", "cpu", "--batch_size", "4", "--num_workers", "0", "--no_pin_mem"])
        args.rank, args.gpu = 0, None  # printed by main(); set only under torchrun (alitok.md 1.6)
        orig_load, orig_cls = torch.load, modeling.alitok.AliTok
        torch.load = lambda *a, **k: state  # main() loads weights/AliTok.pth: hand it the random weights
        modeling.alitok.AliTok = lambda: model
        try:
            pretokenization.main(args)
        finally:
            torch.load, modeling.alitok.AliTok = orig_load, orig_cls
        views = torch.cat(seen)  # (6 * 10, 3, 256, 256), dataset order = sorted classes, sorted files
        u8 = (views * 255).round()
        assert torch.equal(u8 / 255, views), "ToTensor output is not on the uint8 grid"
        u8 = u8.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        order = sorted(images)
        # 16,380 latents: some near-ties are expected. Those ids are marked; the test compares them loosely.
        clear = (R.nearest_gaps(encode_latents(model, views), model.quantize.embedding.weight) > MIN_MARGIN).numpy()
        assert clear.mean() > 0.98, f"too many near-ties in the ten-crop draw ({clear.mean()}): change TENCROP_SEED"
        codes, hashes = [], []
        for i, rel in enumerate(order):
            c = np.load(os.path.join(tmp, "cache", rel + ".npz"), allow_pickle=False)["codes"]
            assert c.shape == (10, 273), c.shape
            codes.append(c.astype(np.int16))
            hashes.append(R.view_hashes(u8[10 * i: 10 * i + 10]))
    out.update(tencrop_codes=np.stack(codes), tencrop_names=np.array(order), tencrop_view_sha256=np.array(hashes),
               tencrop_clear=clear.reshape(len(order), 10, -1))
    meta["tencrop"] = {"seed": R.TENCROP_SEED, "arch": R.TENCROP_ARCH, "codebook_scale": scale,
                       "near_ties": int((~clear).sum()), "min_gap": MIN_MARGIN,
                       "state_checksum": R.state_checksum(state), "images": order,
                       "unique_ids": int(np.unique(np.stack(codes)).size)}
    print(f"ten-crop: {len(order)} images, codebook scale {scale}, {int((~clear).sum())} near-tie ids of {clear.size}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alitok", required=True, help=f"checkout of ali-vilab/alitok at {COMMIT} (outside this project)")
    p.add_argument("--out", default=os.path.join(HERE, "golden"))
    a = p.parse_args()
    sys.path.insert(0, os.path.abspath(a.alitok))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rev = ""
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "-C", a.alitok, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out, meta = {}, {"official_code": f"github.com/ali-vilab/alitok@{COMMIT}", "checkout_rev": rev,
                     "torch": torch.__version__, "device": "cpu", "dtype": "float32"}
    parity(out, meta)
    tencrop(out, meta)
    os.makedirs(a.out, exist_ok=True)
    np.savez_compressed(os.path.join(a.out, "alitok_parity.npz"),
                        **{k: v for k, v in out.items() if k.startswith("parity_")})
    np.savez_compressed(os.path.join(a.out, "alitok_tencrop.npz"),
                        **{k: v for k, v in out.items() if k.startswith("tencrop_")})
    with open(os.path.join(a.out, "alitok_goldens.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {a.out}/alitok_parity.npz, alitok_tencrop.npz, alitok_goldens.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
