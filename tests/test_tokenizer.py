"""MaskGIT-VQGAN tokenizer (spec 7.1): key layout, parameter counts, the shortcut quirk, avg-pool
downsampling, decoder level order, quantizer, round trip, and building / loading weights."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from rear_ds.config import TokenizerConfig
from rear_ds.models.tokenizers import TokenizerWeightsError, build_tokenizer, tokenizer_weights_sha256
from rear_ds.models.tokenizers.convert import main as convert_main
from rear_ds.models.tokenizers.maskgit_vqgan import DownLevel, MaskGITVQGAN, ResnetBlock
from rear_ds.models.weights import WeightsError, save_safetensors

# Levels with 8, 16 and 32 channels, so every level of the decoder has a different shape.
TINY = dict(name="toy_vq", image_size=16, base_channels=8, channel_mult=[1, 2, 4], num_res_blocks=2,
            codebook_size=16, embed_dim=8)


def tiny(**kw) -> MaskGITVQGAN:
    torch.manual_seed(0)
    model = MaskGITVQGAN(TokenizerConfig(**{**TINY, **kw})).eval()
    _randomize(model)
    return model


def _randomize(module: torch.nn.Module) -> None:
    """Non-trivial GroupNorm affines and biases so the hand computations below test something."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def spec_keys() -> list:
    """The 168 keys of maskgit-vqgan-imagenet-f16-256.bin, written out from spec 7.1."""
    def block(prefix, shortcut):
        keys = [f"{prefix}.{n}" for n in ("norm1.weight", "norm1.bias", "conv1.weight",
                                           "norm2.weight", "norm2.bias", "conv2.weight")]
        return keys + ([f"{prefix}.nin_shortcut.weight"] if shortcut else [])

    keys = ["encoder.conv_in.weight"]
    for i in range(5):
        for j in range(2):
            keys += block(f"encoder.down.{i}.block.{j}", shortcut=(i, j) in {(2, 0), (4, 0)})
    keys += block("encoder.mid.0", False) + block("encoder.mid.1", False)
    keys += ["encoder.norm_out.weight", "encoder.norm_out.bias", "encoder.conv_out.weight", "encoder.conv_out.bias",
             "quantize.embedding.weight", "decoder.conv_in.weight", "decoder.conv_in.bias"]
    keys += block("decoder.mid.0", False) + block("decoder.mid.1", False)
    for i in range(5):
        for j in range(2):
            keys += block(f"decoder.up.{i}.block.{j}", shortcut=(i, j) in {(3, 0), (1, 0)})
        if i > 0:
            keys += [f"decoder.up.{i}.upsample_conv.weight", f"decoder.up.{i}.upsample_conv.bias"]
    return keys + ["decoder.norm_out.weight", "decoder.norm_out.bias",
                   "decoder.conv_out.weight", "decoder.conv_out.bias"]


# ----------------------------------------------------------------------------- full-size layout


def test_default_config_matches_the_released_state_dict_layout():
    with torch.device("meta"):
        sd = MaskGITVQGAN(TokenizerConfig()).state_dict()
    assert len(sd) == 168 and sorted(sd) == sorted(spec_keys())

    def count(prefix):
        return sum(v.numel() for k, v in sd.items() if k.startswith(prefix))

    assert count("encoder.") == 23_775_104 and round(count("encoder.") / 1e6, 1) == 23.8
    assert count("decoder.") == 30_478_339 and round(count("decoder.") / 1e6, 1) == 30.5
    assert count("quantize.") == 1024 * 256
    assert count("") == 54_515_587 and round(count("") / 1e6, 1) == 54.5
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.conv1.weight": (256, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 256, 1, 1),  # cout -> cout: the quirk
        "encoder.down.4.block.0.nin_shortcut.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 1, 1),
        "quantize.embedding.weight": (1024, 256),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.up.4.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 256, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 128, 1, 1),
        "decoder.up.1.upsample_conv.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_full_size_forward_256():
    torch.manual_seed(0)
    model = MaskGITVQGAN(TokenizerConfig()).eval()
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    ids = model.encode(torch.rand(1, 3, 256, 256))
    assert ids.shape == (1, 16, 16) and ids.dtype == torch.int64 and 0 <= ids.min() <= ids.max() < 1024
    images = model.decode(ids.flatten(1))
    assert images.shape == (1, 3, 256, 256) and 0 <= images.min() <= images.max() <= 1


# ----------------------------------------------------------------------------- building blocks


def _hand_branch(block: ResnetBlock, x: torch.Tensor, groups_in: int, groups_out: int) -> torch.Tensor:
    """u = conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))), written with functional ops."""
    u = F.group_norm(x, groups_in, block.norm1.weight, block.norm1.bias, eps=1e-6)
    u = F.conv2d(F.silu(u), block.conv1.weight, padding=1)
    u = F.group_norm(u, groups_out, block.norm2.weight, block.norm2.bias, eps=1e-6)
    return F.conv2d(F.silu(u), block.conv2.weight, padding=1)


@pytest.mark.parametrize("cin,cout,gin,gout", [(8, 16, 8, 16), (32, 64, 32, 32)])
def test_shortcut_quirk_applies_nin_shortcut_to_the_branch_output(cin, cout, gin, gout):
    torch.manual_seed(0)
    block = ResnetBlock(cin, cout)
    _randomize(block)
    assert block.conv1.bias is None and block.conv2.bias is None and block.nin_shortcut.bias is None
    x = torch.randn(2, cin, 6, 6)
    with torch.no_grad():
        u = _hand_branch(block, x, gin, gout)
        torch.testing.assert_close(block(x), u + F.conv2d(u, block.nin_shortcut.weight), rtol=1e-5, atol=1e-5)
        block.nin_shortcut.weight.copy_(torch.eye(cout)[:, :, None, None])
        torch.testing.assert_close(block(x), 2 * u, rtol=1e-5, atol=1e-5)


def test_same_channel_block_adds_the_input():
    torch.manual_seed(0)
    block = ResnetBlock(16, 16)
    _randomize(block)
    assert block.nin_shortcut is None and "nin_shortcut.weight" not in block.state_dict()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _hand_branch(block, x, 16, 16) + x, rtol=1e-5, atol=1e-5)


def test_group_norm_needs_channels_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        MaskGITVQGAN(TokenizerConfig(**{**TINY, "base_channels": 48, "channel_mult": [1]}))


def test_downsampling_is_2x2_average_pooling_without_parameters():
    torch.manual_seed(0)
    level = DownLevel(8, 16, num_blocks=2, downsample=True)
    _randomize(level)
    assert all(k.startswith("block.") for k in level.state_dict())
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        h = level.block[1](level.block[0](x))
        pooled = h.reshape(1, 16, 3, 2, 3, 2).mean(dim=(3, 5))
        torch.testing.assert_close(level(x), pooled, rtol=1e-5, atol=1e-6)
        level.downsample = False
        torch.testing.assert_close(level(x), h)


def test_encoder_pools_after_every_level_but_the_last():
    model = tiny()
    enc = model.encoder
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        h = enc.conv_in(x)
        for i, level in enumerate(enc.down):
            for blk in level.block:
                h = blk(h)
            if i < len(enc.down) - 1:
                h = F.avg_pool2d(h, 2)
        for blk in enc.mid:
            h = blk(h)
        z = enc.conv_out(F.silu(F.group_norm(h, 32, enc.norm_out.weight, enc.norm_out.bias, eps=1e-6)))
        assert z.shape == (2, 8, 4, 4)
        torch.testing.assert_close(enc(x), z)
    assert enc.conv_in.bias is None and enc.conv_out.bias is not None


def test_decoder_runs_levels_from_coarsest_to_finest():
    model = tiny()
    dec = model.decoder
    sd = model.state_dict()
    shapes = {
        "decoder.conv_in.weight": (32, 8, 3, 3),
        "decoder.up.2.block.0.conv1.weight": (32, 32, 3, 3),
        "decoder.up.2.upsample_conv.weight": (32, 32, 3, 3),
        "decoder.up.1.block.0.conv1.weight": (16, 32, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (16, 16, 1, 1),
        "decoder.up.1.upsample_conv.weight": (16, 16, 3, 3),
        "decoder.up.0.block.0.conv1.weight": (8, 16, 3, 3),
        "decoder.conv_out.weight": (3, 8, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("decoder.up.0.upsample_conv") for k in sd)
    z = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        h = dec.conv_in(z)
        for blk in dec.mid:
            h = blk(h)
        for i in (2, 1, 0):
            for blk in dec.up[i].block:
                h = blk(h)
            if i > 0:
                up = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
                h = F.conv2d(up, dec.up[i].upsample_conv.weight, dec.up[i].upsample_conv.bias, padding=1)
        out = F.conv2d(F.silu(F.group_norm(h, 8, dec.norm_out.weight, dec.norm_out.bias, eps=1e-6)),
                       dec.conv_out.weight, dec.conv_out.bias, padding=1)
        assert out.shape == (2, 3, 16, 16)
        torch.testing.assert_close(dec(z), out)


# ----------------------------------------------------------------------------- tokenizer interface


def test_encode_picks_the_nearest_codebook_row_in_raster_order():
    model = tiny()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        z = model.encoder(x)
        model.quantize.embedding.weight.copy_(torch.randn(16, 8) * z.std() + z.mean())
        ids = model.encode(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, 8)  # position (r, c) -> index r * w + c
        expected = torch.cdist(flat.double(), model.quantize.embedding.weight.double()).argmin(1)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.int64
    assert torch.equal(ids.flatten(), expected)
    assert len(ids.unique()) > 1


def test_round_trip_and_codebook_vectors():
    model = tiny()
    assert model.grid == (4, 4) and model.num_tokens == 16 and model.codebook_size == 16 and model.embed_dim == 8
    x = torch.rand(2, 3, 16, 16)
    ids = model.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # encoding always runs in fp32
        assert torch.equal(model.encode(x), ids)
    images = model.decode(ids)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() <= images.max() <= 1
    torch.testing.assert_close(model.decode(ids.flatten(1)), images, rtol=0, atol=0)
    tokens = torch.randint(0, 16, (2, 5))
    assert torch.equal(model.codebook_vectors(tokens), model.quantize.embedding.weight[tokens])
    assert torch.equal(model.codebook_vectors(torch.arange(16)), model.quantize.embedding.weight)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.full((1, 16), 16))  # e.g. the generator's [MASK] id
    with pytest.raises(ValueError, match=r"\(B, 4, 4\) or flat \(B, 16\) ids \(grid 4x4=16\)"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.rand(1, 3, 18, 16))


# ----------------------------------------------------------------------------- building and loading


def test_missing_weights_say_which_file_to_put_where(tmp_path):
    with pytest.raises(TokenizerWeightsError) as err:
        build_tokenizer(TokenizerConfig())
    msg = str(err.value)
    assert "maskgit-vqgan-imagenet-f16-256.bin" in msg and "fun-research/TiTok" in msg and "tokenizer.weights=" in msg
    missing = str(tmp_path / "maskgit.bin")
    with pytest.raises(TokenizerWeightsError, match="does not exist") as err:
        build_tokenizer(TokenizerConfig(weights=missing))
    assert missing in str(err.value) and "fun-research/TiTok" in str(err.value)
    with pytest.raises(TokenizerWeightsError, match="load_weights=False"):
        build_tokenizer(TokenizerConfig(**TINY))


def test_strict_load_of_bin_and_safetensors_copy(tmp_path):
    reference = tiny()
    bin_path, st_path = tmp_path / "toy.bin", tmp_path / "toy.safetensors"
    torch.save(reference.state_dict(), bin_path)
    assert convert_main([str(bin_path), str(st_path), "--no-check"]) == 0
    x = torch.rand(2, 3, 16, 16)
    for path in (bin_path, st_path):
        tok = build_tokenizer(TokenizerConfig(**TINY, weights=str(path)))
        assert isinstance(tok, MaskGITVQGAN) and not tok.training
        assert not any(p.requires_grad for p in tok.parameters())
        assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), reference.state_dict().values()))
        assert torch.equal(tok.encode(x), reference.encode(x))


def test_strict_load_rejects_weights_of_another_config(tmp_path):
    path = tmp_path / "other.safetensors"
    save_safetensors(tiny(num_res_blocks=1).state_dict(), str(path))
    with pytest.raises(WeightsError) as err:
        build_tokenizer(TokenizerConfig(**TINY, weights=str(path)))
    msg = str(err.value)
    assert str(path) in msg and "num_res_blocks=2" in msg and "encoder.down.0.block.1.conv1.weight" in msg


def test_convert_checks_the_maskgit_layout_by_default(tmp_path, capsys):
    src = tmp_path / "toy.bin"
    torch.save(tiny().state_dict(), src)
    assert convert_main([str(src), str(tmp_path / "out.safetensors")]) == 1
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_sha256(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    assert tokenizer_weights_sha256(str(path)) == hashlib.sha256(b"abc" * 1000).hexdigest()
