"""The reAR objective on hand-checkable cases (spec section 3), and a short training run that learns."""
import math

import pytest
import torch
import torch.nn.functional as F

from rear_ds.config import ModelConfig, ObjectiveConfig
from rear_ds.objective import ReARObjective, perturb_tokens, rho_schedule


def test_rho_schedule_formula():
    assert rho_schedule(0, 0, 187_500) == 1.0
    assert rho_schedule(93_750, 0, 187_500) == 0.5
    assert rho_schedule(187_500, 0, 187_500) == 0.0
    assert rho_schedule(250_000, 0, 187_500) == 0.0
    assert rho_schedule(5, 10, 20) == 1.0 and rho_schedule(15, 10, 20) == 0.5


def test_perturbation_statistics_and_modes():
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 1024, (4000, 256), generator=g)
    noisy, mask = perturb_tokens(toks, 1.0, "switch", 1024, g)
    assert abs(mask.float().mean().item() - 0.5) < 0.02  # E[U * rho] = rho / 2
    per_sample = mask.float().mean(1)
    assert per_sample.min() < 0.02 and per_sample.max() > 0.98  # per-sample ratios spread over [0, rho]
    assert torch.equal(noisy[~mask], toks[~mask]) and noisy.max() < 1024
    noisy, mask = perturb_tokens(toks[:100], 0.4, "mask", 1024, g)
    assert torch.all(noisy[mask] == 1024) and mask.float().mean() < 0.25
    noisy, mask = perturb_tokens(toks[:10], 0.0, "switch", 1024, g)
    assert not mask.any() and torch.equal(noisy, toks[:10])


class FixedModel(torch.nn.Module):
    """Returns given logits and features; records the inputs it was called with."""

    def __init__(self, logits, enc, dec, cfg):
        super().__init__()
        self.out = (logits, enc, dec)
        self.cfg = cfg
        self.calls = []

    def class_token_ids(self, labels, drop=None):
        ids = labels + self.cfg.class_offset
        return ids if drop is None else torch.where(drop, torch.full_like(ids, self.cfg.null_class_id), ids)

    def forward(self, tokens, class_ids, encode_align=False, decode_align=False):
        self.calls.append((tokens.clone(), class_ids.clone(), encode_align, decode_align))
        return self.out


def make_case():
    """B=2, N=3, K=4, z=2 with hand-chosen features whose cosines are easy to read off."""
    mcfg = ModelConfig(hidden_size=8, depth=2, num_heads=2, mlp_dim=16, codebook_size=4, num_classes=5,
                       num_tokens=3, align_z_dim=2, decode_align_layer=1)
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -2.0]])
    tokens = torch.tensor([[0, 1, 2], [3, 0, 1]])
    labels = torch.tensor([1, 4])
    logits = torch.randn(2, 3, 4)
    enc = codebook[tokens].clone() * 3.0  # cos = 1 everywhere
    enc[0, 1] = torch.tensor([1.0, 0.0])  # vs codebook[1] = (0, 1): cos 0
    dec = -codebook[tokens]  # cos = -1 everywhere
    dec[1, 2] = torch.tensor([1.0, 1.0])  # vs (0, 1): cos 1/sqrt(2)
    return mcfg, codebook, tokens, labels, logits, enc, dec


def test_loss_terms_by_hand():
    mcfg, codebook, tokens, labels, logits, enc, dec = make_case()
    model = FixedModel(logits, enc, dec, mcfg)
    obj = ReARObjective(ObjectiveConfig(class_dropout=0.0, anneal_end=10), mcfg)
    noise = torch.tensor([[False, False, True], [False, True, False]])
    noisy = torch.tensor([[0, 1, 3], [3, 2, 1]])
    loss, m = obj(model, tokens, labels, codebook, step=0, noisy_tokens=noisy, noise_mask=noise)
    # The model sees the noisy tokens; labels stay clean.
    assert torch.equal(model.calls[0][0], noisy)
    assert model.calls[0][1].tolist() == [mcfg.class_offset + 1, mcfg.class_offset + 4]
    ce = F.cross_entropy(logits.reshape(-1, 4), tokens.reshape(-1))
    # Encode: cos 1 at the 4 unmasked positions except (0,1) where cos 0 -> sum 3; divided by B*N = 6.
    enc_expected = -3.0 / 6
    # Decode: never masked: five -1 and one 1/sqrt(2).
    dec_expected = -(-5.0 + 1 / math.sqrt(2)) / 6
    assert m["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert m["enc_align"].item() == pytest.approx(enc_expected, abs=1e-6)
    assert m["dec_align"].item() == pytest.approx(dec_expected, abs=1e-6)
    assert loss.item() == pytest.approx(ce.item() + enc_expected + dec_expected, abs=1e-6)
    assert m["noise_frac"].item() == pytest.approx(2 / 6)


def test_switches_give_the_plain_ar_baseline():
    mcfg, codebook, tokens, labels, logits, enc, dec = make_case()
    model = FixedModel(logits, None, None, mcfg)
    cfg = ObjectiveConfig(noisy_context=False, encode_align=False, decode_align=False, class_dropout=0.0, anneal_end=10)
    loss, m = ReARObjective(cfg, mcfg)(model, tokens, labels, codebook, step=0)
    assert torch.equal(model.calls[0][0], tokens) and model.calls[0][2:] == (False, False)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 4), tokens.reshape(-1)).item())
    assert m["rho"].item() == 0.0
    # Encode masking can be switched off (the paper's wording): then all positions count.
    model = FixedModel(logits, enc, dec, mcfg)
    cfg = ObjectiveConfig(mask_encode_at_perturbed=False, class_dropout=0.0, anneal_end=10)
    noise = torch.tensor([[False, False, True], [False, True, False]])
    _, m = ReARObjective(cfg, mcfg)(model, tokens, labels, codebook, step=0, noisy_tokens=tokens, noise_mask=noise)
    assert m["enc_align"].item() == pytest.approx(-5.0 / 6, abs=1e-6)


def test_rho_and_class_dropout_applied_in_training():
    mcfg, codebook, tokens, labels, logits, enc, dec = make_case()
    tokens = torch.randint(0, 4, (512, 3))
    labels = torch.randint(0, 5, (512,))
    model = FixedModel(torch.randn(512, 3, 4), torch.randn(512, 3, 2), torch.randn(512, 3, 2), mcfg)
    obj = ReARObjective(ObjectiveConfig(class_dropout=0.1, anneal_start=0, anneal_end=100), mcfg)
    g = torch.Generator().manual_seed(0)
    _, m = obj(model, tokens, labels, codebook, step=50, generator=g)
    assert m["rho"].item() == 0.5
    assert 0.15 < m["noise_frac"].item() < 0.35  # about rho / 2
    dropped = (model.calls[0][1] == mcfg.null_class_id).float().mean().item()
    assert 0.05 < dropped < 0.16
    _, m = obj(model, tokens, labels, codebook, step=200, generator=g)
    assert m["rho"].item() == 0.0 and m["noise_frac"].item() == 0.0
    _, m = obj(model, tokens, labels, codebook, step=0, generator=g, training=False)
    assert (model.calls[-1][1] != mcfg.null_class_id).all() and m["noise_frac"].item() == 0.0


def test_tiny_model_learns(tiny_cfg):
    """A few hundred AdamW steps on a structured synthetic token set bring the loss clearly down."""
    from rear_ds.models.generator import ReARGenerator

    torch.manual_seed(0)
    cfg = tiny_cfg
    model = ReARGenerator(cfg.model)
    obj = ReARObjective(cfg.objective, cfg.model)
    codebook = torch.randn(64, 16)
    # Each class has its own token pattern: token i of class c is (c * 7 + 3 * i) mod 64, with 10% noise.
    def batch(n, g):
        labels = torch.randint(0, 10, (n,), generator=g)
        toks = (labels[:, None] * 7 + 3 * torch.arange(16)[None]) % 64
        noise = torch.rand(n, 16, generator=g) < 0.1
        return torch.where(noise, torch.randint(0, 64, (n, 16), generator=g), toks), labels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(200):
        toks, labels = batch(32, g)
        loss, m = obj(model, toks, labels, codebook, step=step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(m["ce"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 3.5 and last < 1.5, (first, last)


def test_one_head_serves_both_terms_as_in_the_reference():
    """With one head off, the reference reuses the enabled head's features for both terms (encode term masked)."""
    mcfg, codebook, tokens, labels, logits, enc, dec = make_case()
    noise = torch.tensor([[False, False, True], [False, True, False]])
    ce = F.cross_entropy(logits.reshape(-1, 4), tokens.reshape(-1)).item()
    # Decode head only: dec features give cos -1 everywhere except (1, 2) = 1/sqrt(2).
    model = FixedModel(logits, None, dec, mcfg)
    cfg = ObjectiveConfig(encode_align=False, class_dropout=0.0, anneal_end=10)
    loss, m = ReARObjective(cfg, mcfg)(model, tokens, labels, codebook, 0, noisy_tokens=tokens, noise_mask=noise)
    assert model.calls[0][2:] == (False, True)
    assert m["enc_align"].item() == pytest.approx(-(-3.0 + 1 / math.sqrt(2)) / 6, abs=1e-6)  # unmasked: 4 positions
    assert m["dec_align"].item() == pytest.approx(-(-5.0 + 1 / math.sqrt(2)) / 6, abs=1e-6)
    # Encode head only: enc features (cos 1, except (0, 1) = 0) serve the unmasked decode term too.
    model = FixedModel(logits, enc, None, mcfg)
    cfg = ObjectiveConfig(decode_align=False, class_dropout=0.0, anneal_end=10)
    loss, m = ReARObjective(cfg, mcfg)(model, tokens, labels, codebook, 0, noisy_tokens=tokens, noise_mask=noise)
    assert m["enc_align"].item() == pytest.approx(-3.0 / 6, abs=1e-6)
    assert m["dec_align"].item() == pytest.approx(-5.0 / 6, abs=1e-6)
    assert loss.item() == pytest.approx(ce - 8.0 / 6, abs=1e-5)


def test_equal_align_layers_rejected():
    from rear_ds.config import ConfigError

    with pytest.raises(ConfigError, match="must differ"):
        ModelConfig(hidden_size=8, depth=4, num_heads=2, mlp_dim=16, encode_align_layer=2,
                    decode_align_layer=2).validate()
