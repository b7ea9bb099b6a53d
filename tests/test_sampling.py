"""The sampler: CFG schedule, per-index randomness, KV cache vs recompute (spec section 6)."""
import math

import pytest
import torch

from rear_ds.sampling import cfg_weight, draw, filter_logits, generate, sample_uniforms


def test_cfg_schedule_formula():
    N = 256
    for g, pw in ((15.0, 2.5), (10.0, 1.75), (22.0, 2.75)):
        assert cfg_weight(0, N, g, pw) == 1.0  # pure conditional at the first step
        for k in (1, 64, 128, 255):
            s = (1 - math.cos(math.pi * (k / N) ** pw)) / 2
            assert cfg_weight(k, N, g, pw) == pytest.approx(1 + (g - 1) * s)
        assert cfg_weight(255, N, g, pw) == pytest.approx(g, rel=0.01)
        assert all(cfg_weight(k, N, g, pw) <= cfg_weight(k + 1, N, g, pw) for k in range(N - 1))


def test_uniforms_depend_only_on_seed_and_index():
    a = sample_uniforms(42, torch.tensor([0, 1, 2, 3]), 16)
    b = sample_uniforms(42, torch.tensor([3, 1]), 16)
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sample_uniforms(43, torch.tensor([0]), 16)[0], a[0])


def test_draw_is_inverse_cdf_of_the_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    assert draw(logits, torch.tensor([0.2])).item() == 0
    assert draw(logits, torch.tensor([0.3])).item() == 1
    # Empirical frequencies follow the softmax (here of logits tempered by T = 2, as generate() passes them).
    u = torch.rand(20000, dtype=torch.float64)
    picks = draw(logits.repeat(20000, 1) / 2.0, u).float().mean().item()
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    assert picks == pytest.approx(p1, abs=0.015)


def test_top_k_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, top_p=float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.equal(filter_logits(logits), logits)  # both off by default


def test_generate_kv_equals_recompute_and_is_batch_independent(tiny_model, tiny_cfg):
    s = tiny_cfg.sampling
    labels, idx = torch.tensor([0, 1, 2, 3, 4]), torch.arange(10, 15)
    s.kv_cache = True
    a = generate(tiny_model, labels, idx, 7, s)
    s.kv_cache = False
    b = generate(tiny_model, labels, idx, 7, s)
    assert torch.equal(a, b)
    s.kv_cache = True
    c = torch.cat([generate(tiny_model, labels[i:i + 2], idx[i:i + 2], 7, s) for i in range(0, 5, 2)])
    assert torch.equal(a, c)  # other batch sizes, same images
    assert a.shape == (5, 16) and a.max() < 64
    d = generate(tiny_model, labels, idx, 8, s)
    assert not torch.equal(a, d)  # the seed matters


def test_guidance_changes_samples_and_bf16_runs(tiny_model, tiny_cfg):
    s = tiny_cfg.sampling
    labels, idx = torch.arange(8) % 10, torch.arange(8)
    s.guidance_scale = 1.0
    plain = generate(tiny_model, labels, idx, 0, s)
    s.guidance_scale = 8.0
    guided = generate(tiny_model, labels, idx, 0, s)
    assert not torch.equal(plain, guided)
    s.precision = "bf16"
    lowp = generate(tiny_model, labels, idx, 0, s)
    assert lowp.shape == guided.shape and not tiny_model.training
