"""AliTok tokenizer (alitok.md section 1): the released key layout and parameter count, the token layout,
the quantizer, the decoder's pixel shuffle, the interface (shapes, errors, autocast), building and loading.
Parity with the official code is in tests/test_alitok_parity.py."""
import os

import pytest
import torch

from rear_ds.config import ConfigError, TokenizerConfig, load_config
from rear_ds.models.tokenizers import TokenizerWeightsError, build_tokenizer, released_config
from rear_ds.models.tokenizers.alitok import AliTok
from rear_ds.models.tokenizers.convert import main as convert_main
from rear_ds.models.weights import WeightsError, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tokenizer_alitok_tiny.yaml")


def tiny_cfg(**kw) -> TokenizerConfig:
    from rear_ds.data.tokenize_job import tokenizer_config

    cfg = tokenizer_config(TINY_YAML)
    for k, v in kw.items():
        setattr(cfg.alitok if hasattr(cfg.alitok, k) else cfg, k, v)
    return cfg


def tiny(seed: int = 0, **kw) -> AliTok:
    torch.manual_seed(seed)
    return AliTok(tiny_cfg(**kw)).eval()


def released_keys() -> list:
    """The 456 keys of AliTok.pth in file order, written out from the spec's key table (alitok.md 1.5)."""
    def blocks(prefix, n):
        per = ["ln_1.weight", "ln_1.bias", "attn.in_proj.weight", "attn.in_proj.bias", "attn.out_proj.weight",
               "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias"]
        return [f"{prefix}.transformer.{i}.{k}" for i in range(n) for k in per]

    ln = ["ln_pre.weight", "ln_pre.bias"]
    post = ["ln_post.weight", "ln_post.bias"]
    enc = ["encoder.positional_embedding", "encoder.latent_token_positional_embedding", "encoder.patch_embed.weight",
           "encoder.patch_embed.bias"] + [f"encoder.{k}" for k in ln] + blocks("encoder", 12) \
        + [f"encoder.{k}" for k in post] + ["encoder.conv_out.weight", "encoder.conv_out.bias"]
    dec = ["decoder.class_embedding", "decoder.latent_token_positional_embedding", "decoder.decoder_embed.weight",
           "decoder.decoder_embed.bias"] + [f"decoder.{k}" for k in ln] + blocks("decoder", 24) \
        + [f"decoder.{k}" for k in post] + ["decoder.ffn.0.weight", "decoder.ffn.0.bias", "decoder.conv_out.weight",
                                            "decoder.conv_out.bias"]
    return ["latent_tokens"] + enc + dec + ["quantize.embedding.weight"]


# ----------------------------------------------------------------------------- the released layout


def test_released_layout_keys_shapes_and_parameter_count():
    cfg = released_config("alitok")
    assert (cfg.num_tokens, cfg.prefix_tokens, cfg.grid, cfg.codebook_size, cfg.embed_dim) == (273, 17, (16, 16), 4096, 32)
    with torch.device("meta"):
        model = AliTok(cfg)
    sd = model.state_dict()
    assert list(sd) == released_keys() and len(sd) == 456  # the file's key order too
    count = lambda p: sum(v.numel() for k, v in sd.items() if k.startswith(p))  # noqa: E731
    assert sum(v.numel() for v in sd.values()) == 389_899_308
    assert (count("latent_tokens"), count("encoder."), count("decoder."), count("quantize.")) == \
        (209_664, 86_079_008, 303_479_564, 131_072)
    assert len(list(model.buffers())) == 0
    shapes = {
        "latent_tokens": (273, 768), "encoder.patch_embed.weight": (768, 3, 16, 16),
        "encoder.positional_embedding": (256, 768), "encoder.latent_token_positional_embedding": (273, 768),
        "encoder.transformer.11.attn.in_proj.weight": (2304, 768), "encoder.transformer.0.mlp.c_fc.weight": (3072, 768),
        "encoder.transformer.0.mlp.c_proj.weight": (768, 3072), "encoder.conv_out.weight": (32, 768, 1, 1),
        "decoder.decoder_embed.weight": (1024, 32), "decoder.class_embedding": (32, 1024),
        "decoder.latent_token_positional_embedding": (305, 1024), "decoder.transformer.23.mlp.c_fc.weight": (4096, 1024),
        "decoder.ffn.0.weight": (768, 1024, 1, 1), "decoder.conv_out.weight": (3, 3, 1, 1),
        "quantize.embedding.weight": (4096, 32),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_config_layout_and_validation():
    cfg = tiny_cfg()
    assert (cfg.family, cfg.grid, cfg.prefix_tokens, cfg.num_tokens, cfg.downsample) == ("alitok", (4, 4), 4, 20, 8)
    assert TokenizerConfig().prefix_tokens == 0 and TokenizerConfig().num_tokens == 256
    assert "alitok" in cfg.architecture() and "base_channels" not in cfg.architecture()
    assert "alitok" not in TokenizerConfig().architecture()  # MaskGIT-VQGAN records are unchanged
    with pytest.raises(ConfigError, match=r"tokenizer.alitok.encoder_width=32 must be divisible by "
                                          r"tokenizer.alitok.encoder_heads=3"):
        tiny_cfg(encoder_heads=3).validate()
    with pytest.raises(ConfigError, match=r"image_size=36 must be divisible .* 8 \(from tokenizer.alitok.patch_size\)"):
        tiny_cfg(image_size=36).validate()
    # A training config: the model's sequence length must be the tokenizer's 20, not its 16 grid tokens.
    over = [f"tokenizer.{k}={v}" for k, v in (("name", "alitok"), ("image_size", 32), ("codebook_size", 64),
                                              ("embed_dim", 16), ("alitok.patch_size", 8), ("alitok.prefix_tokens", 4))]
    with pytest.raises(ConfigError, match=r"model.num_tokens=16 disagrees with the tokenizer 4 prefix \+ 4x4 grid = "
                                          r"20 tokens"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), over)
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml"), over + ["model.num_tokens=20"]).tokenizer.num_tokens == 20


# ----------------------------------------------------------------------------- behaviour


def test_encode_is_the_nearest_codebook_row_of_each_latent_in_token_order():
    model = tiny()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        z = model.latents(x)
        assert z.shape == (3, 20, 16)
        model.quantize.embedding.weight.copy_(torch.randn(64, 16) * z.std() + z.mean())
        ids = model.encode(x)
        expected = torch.cdist(z.reshape(-1, 16).double(), model.quantize.embedding.weight.double()).argmin(1)
    assert ids.shape == (3, 20) and ids.dtype == torch.int64 and model.token_shape == (20,)
    assert torch.equal(ids.flatten(), expected)  # flat index b * 20 + i: prefix i < 4, then grid row * 4 + col
    assert len(ids.unique()) > 10
    with torch.autocast("cpu", dtype=torch.bfloat16):  # encoding always runs in fp32
        assert torch.equal(model.encode(x), ids)


def test_encoder_reads_patches_in_raster_order_and_keeps_the_last_latents():
    """The encoder by hand: patches (raster) + positions, then the latent queries, one pass, last N outputs."""
    model = tiny()
    enc = model.encoder
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, 4, 4, 8, 8): row, col, then pixels
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 64)
        h = patches @ enc.patch_embed.weight.reshape(32, -1).t() + enc.patch_embed.bias + enc.positional_embedding
        q = (model.latent_tokens + enc.latent_token_positional_embedding).expand(2, -1, -1)
        h = enc.ln_pre(torch.cat([h, q], 1))
        for blk in enc.transformer:
            h = blk(h)
        z = enc.ln_post(h[:, 16:]) @ enc.conv_out.weight.reshape(16, 32).t() + enc.conv_out.bias
        torch.testing.assert_close(model.latents(x), z, rtol=1e-5, atol=1e-5)


def test_attention_splits_q_k_v_head_major_and_runs_unmasked():
    torch.manual_seed(0)
    model = tiny()
    attn = model.encoder.transformer[0].attn
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        qkv = attn.in_proj(x)
        q, k, v = (qkv[..., i * 32:(i + 1) * 32].reshape(2, 5, 2, 16).transpose(1, 2) for i in range(3))
        w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # scale 1/sqrt(16); no mask: every pair
        out = attn.out_proj((w @ v).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x), out, rtol=1e-5, atol=1e-5)


def test_decoder_pixel_shuffle_and_registers_by_hand():
    """Channel (p1 * P + p2) * 3 + c of grid cell (r, s) is pixel (r * P + p1, s * P + p2) of colour c; the
    registers go first, only the last h * w outputs become patches, then the 1x1 conv_out and the sigmoid."""
    model = tiny()
    dec = model.decoder
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        e = dec.decoder_embed(model.codebook_vectors(ids))
        h = torch.cat([dec.class_embedding.expand(2, -1, -1), e], 1) + dec.latent_token_positional_embedding
        h = dec.ln_pre(h)
        for blk in dec.transformer:
            h = blk(h)
        cells = dec.ln_post(h[:, -16:])  # (B, 16, 32), cell index r * 4 + s
        vals = cells @ dec.ffn[0].weight.reshape(192, 32).t() + dec.ffn[0].bias  # (B, 16, 8 * 8 * 3)
        img = torch.empty(2, 3, 32, 32)
        for r in range(4):
            for s in range(4):
                for p1 in range(8):
                    for p2 in range(8):
                        for c in range(3):
                            img[:, c, r * 8 + p1, s * 8 + p2] = vals[:, r * 4 + s, (p1 * 8 + p2) * 3 + c]
        img = torch.sigmoid(torch.einsum("oc,bchw->bohw", dec.conv_out.weight[:, :, 0, 0], img)
                            + dec.conv_out.bias[None, :, None, None])
        torch.testing.assert_close(model.decode_unclamped(ids), img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(ids), img.clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_interface_shapes_codebook_vectors_and_errors():
    model = tiny()
    x = torch.rand(2, 3, 32, 32)
    ids = model.encode(x)
    images = model.decode(ids)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() <= images.max() <= 1
    assert model.num_tokens == 20 and model.prefix_tokens == 4 and model.grid == (4, 4)
    assert model.layout == "4 prefix + 4x4 grid = 20 tokens"
    assert torch.equal(model.codebook_vectors(ids), model.quantize.embedding.weight[ids])
    assert model.codebook_vectors(torch.arange(64)).shape == (64, 16)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 20), 64))  # e.g. the generator's [MASK] id
    with pytest.raises(ValueError, match=r"expects \(B, 20\) ids \(4 prefix \+ 4x4 grid"):
        model.decode(torch.zeros(1, 16, dtype=torch.long))  # the grid alone is not enough
    with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\)"):
        model.encode(torch.rand(1, 3, 40, 40))


# ----------------------------------------------------------------------------- building and loading


def test_missing_weights_say_where_to_get_alitok_pth(tmp_path):
    missing = str(tmp_path / "AliTok.pth")
    for cfg in (released_config("alitok"), TokenizerConfig(**{**vars(released_config("alitok")), "weights": missing})):
        with pytest.raises(TokenizerWeightsError) as err:
            build_tokenizer(cfg)
        msg = str(err.value)
        assert "AliTok.pth" in msg and "github.com/ali-vilab/alitok" in msg and "drive.google.com" in msg
        assert "tokenizer.weights=" in msg
    assert missing in msg and "does not exist" in msg


def test_strict_load_of_pth_and_safetensors_copy_names_bad_keys(tmp_path):
    reference = tiny(seed=1)
    pth, st = tmp_path / "tiny.pth", tmp_path / "tiny.safetensors"
    torch.save(reference.state_dict(), pth)
    assert convert_main([str(pth), str(st), "--no-check"]) == 0
    x = torch.rand(2, 3, 32, 32)
    for path in (pth, st):
        tok = build_tokenizer(tiny_cfg(weights=str(path)))
        assert isinstance(tok, AliTok) and not tok.training and not any(p.requires_grad for p in tok.parameters())
        assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), reference.state_dict().values()))
        assert torch.equal(tok.encode(x), reference.encode(x))
        torch.testing.assert_close(tok.decode(tok.encode(x)), reference.decode(reference.encode(x)), rtol=0, atol=0)
    # Missing, unexpected and misshaped keys are all named, with the config the file was checked against.
    sd = reference.state_dict()
    sd.pop("decoder.class_embedding")
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["encoder.conv_out.weight"] = torch.zeros(8, 32, 1, 1)
    bad = tmp_path / "bad.safetensors"
    save_safetensors(sd, str(bad))
    with pytest.raises(WeightsError) as err:
        build_tokenizer(tiny_cfg(weights=str(bad)))
    msg = str(err.value)
    assert str(bad) in msg and "prefix_tokens=4" in msg and "missing 1 keys: decoder.class_embedding" in msg
    assert "unexpected 1 keys: decoder.extra.weight" in msg
    assert "encoder.conv_out.weight (file [8, 32, 1, 1] vs model [16, 32, 1, 1])" in msg


def test_convert_checks_the_released_alitok_layout(tmp_path, capsys):
    src = tmp_path / "tiny.pth"
    torch.save(tiny().state_dict(), src)
    assert convert_main([str(src), str(tmp_path / "out.safetensors"), "--tokenizer", "alitok"]) == 1
    err = capsys.readouterr().err
    assert "wrong shape" in err and "latent_tokens (file [20, 32] vs model [273, 768])" in err
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- parity with the official code


def test_full_size_parity_with_the_official_code(tmp_path):
    """Random weights in the released layout (saved as a plain .pth, as AliTok.pth is), converted to safetensors
    (checked against the released 456-key layout) and loaded strictly; fp32 CPU; golden tensors from the official
    code (tests/make_alitok_goldens.py)."""
    import json

    import numpy as np

    import alitok_reference as R

    meta = json.load(open(os.path.join(ROOT, "tests", "golden", "alitok_goldens.json")))["parity"]
    gold = np.load(os.path.join(ROOT, "tests", "golden", "alitok_parity.npz"), allow_pickle=False)
    cfg = released_config("alitok")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AliTok(cfg).state_dict().items()}
    state = R.random_state(shapes, meta["seed"], meta["codebook_scale"])
    assert R.state_checksum(state) == pytest.approx(meta["state_checksum"], rel=1e-9), "the weight draw changed"
    pth, st = tmp_path / "AliTok.pth", tmp_path / "AliTok.safetensors"
    torch.save(state, pth)
    del state
    assert convert_main([str(pth), str(st), "--tokenizer", "alitok"]) == 0  # checked against the released layout
    cfg.weights = str(st)
    tok = build_tokenizer(cfg)
    x = R.parity_images(meta["seed"])
    with torch.no_grad():
        z = tok.latents(x)
    assert (z - torch.from_numpy(gold["parity_z"])).abs().max() < 1e-4
    assert float(R.nearest_gaps(z, tok.quantize.embedding.weight).min()) > 1e-3  # no near-tie: ids must agree
    ids = tok.encode(x)
    assert torch.equal(ids, torch.from_numpy(gold["parity_ids"]).long())  # prefix first, grid in raster order
    decoded = torch.from_numpy(gold["parity_decoded_u16"].astype(np.float64) / 65535)
    tol = 1e-4 + 0.5 / 65535  # the golden is stored on a 16-bit grid
    raw = tok.decode_unclamped(ids[:1])[0].double()  # decode() is this clamped (tested above on the tiny config)
    assert (raw - decoded).abs().max() < tol and (raw.clamp(0, 1) - decoded.clamp(0, 1)).abs().max() < tol
    # (The converter read the .pth through the safe loader and checked it strictly against the released layout;
    # build_tokenizer on a .pth itself is tested with the tiny config above.)
