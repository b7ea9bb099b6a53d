"""The alitok generator family (alitok spec sections 2, 3.2 and 4.2-4.6): sizes and the released layout, RoPE,
init, parity with the OFFICIAL AliTok AR code (goldens made by tests/make_alitok_ar_goldens.py), KV cache,
sampling, and the reAR terms against a plain-PyTorch computation of spec 3.2."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

import alitok_parity as P
from rear_ds.config import ConfigError, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
from rear_ds.models import build_generator, count_parameters, flops_per_sample, load_generator
from rear_ds.models.alitok_ar import AliTokGenerator, RMSNorm, apply_rope, ffn_width, rope_table
from rear_ds.objective import ReARObjective, rho_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def family_config(name: str) -> ModelConfig:
    from rear_ds.config import load_config

    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml")).model


def small_config(**kw) -> ModelConfig:
    """A small alitok-family model with a prefix: 4 prefix tokens + a 3x3 grid (N = 13)."""
    base = dict(family="alitok", hidden_size=32, depth=4, num_heads=4, mlp_dim=ffn_width(32), codebook_size=16,
                num_classes=5, num_tokens=13, prefix_tokens=4, dropout=0.0, attn_dropout=0.0, tok_dropout=0.0,
                align_proj_dim=32, align_z_dim=8, encode_align_layer=0, decode_align_layer=2)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def randomized(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every weight random (the zero output head would hide bugs); norm weights around 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, std)
    return model


def released_layout(depth: int, D: int, heads: int, ffn: int, K: int = 4096, C: int = 1000) -> dict:
    """{name: shape} of alitok_{b,l,xl}.bin, written out from alitok spec 2.6 (not from the model code)."""
    hd = D // heads
    out = {"embeddings.weight": (K + 1 + C + 1, D), "norm.weight": (D,), "output.weight": (K, D), "output.bias": (K,)}
    for i in range(depth):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": (D,), b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                    b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,), b + "attn.proj.weight": (D, D),
                    b + "attn.proj.bias": (D,), b + "norm2.weight": (D,), b + "mlp.w1.weight": (ffn, D),
                    b + "mlp.w3.weight": (ffn, D), b + "mlp.w2.weight": (D, ffn)})
    return out


# ---------------------------------------------------------------------------------------------------
# Sizes and the released layout (spec 2.5, 2.6)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,D,depth,ffn,params,keys", [
    ("rear_b_alitok", 768, 24, 2048, 177_048_064, 268),
    ("rear_l_alitok", 1024, 24, 2816, 317_851_648, 268),
    ("rear_xl_alitok", 1280, 32, 3584, 662_141_696, 356)])
def test_released_sizes_and_state_dict_layout(name, D, depth, ffn, params, keys):
    cfg = family_config(name)
    assert (cfg.hidden_size, cfg.depth, cfg.mlp_dim, ffn_width(D)) == (D, depth, ffn, ffn)
    assert count_parameters(cfg) == params
    assert cfg.decode_align_layer == 3 * depth // 4 and cfg.encode_align_layer == 0
    with torch.device("meta"):
        model = build_generator(cfg, with_align_heads=False)
    sd = model.state_dict()
    want = released_layout(depth, D, 16, ffn)
    assert len(sd) == len(want) == keys
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    if name == "rear_b_alitok":  # spec 3.3: + 2 x 5,836,832 for the 3-layer SiLU heads
        assert count_parameters(cfg, include_align=True) == params + 2 * 5_836_832


def test_model_info_prints_the_family(capsys):
    from rear_ds.model_info import main

    main([os.path.join(ROOT, "configs", "rear_b_alitok.yaml")])
    out = capsys.readouterr().out
    assert "family                      alitok" in out and "177.0M (177,048,064)" in out and "L=274" in out


@pytest.mark.parametrize("name,low,high", [("rear_1p5b_alitok", 1.4e9, 1.6e9), ("rear_3b_alitok", 2.8e9, 3.3e9)])
def test_scaling_sizes(name, low, high):
    cfg = family_config(name)
    assert low < count_parameters(cfg) < high
    assert cfg.decode_align_layer == 3 * cfg.depth // 4 and cfg.mlp_dim == ffn_width(cfg.hidden_size)


def test_recipe_in_the_configs():
    """Spec 2.7 / 2.8 / 3.2: the schedule, batch, CFG defaults, and the anneal end derived from total steps."""
    for name, total, micro, cfg_ in (("b", 500_000, 128, (16.0, 1.8)), ("l", 500_000, 64, (6.0, 0.7)),
                                     ("xl", 250_000, 32, (13.0, 1.4))):
        with open(os.path.join(ROOT, "configs", f"rear_{name}_alitok.yaml")) as f:
            text = f.read()
        y = yaml.safe_load(text)
        o = y["optim"]
        assert (o["lr"], o["end_lr"], o["betas"], o["weight_decay"], o["warmup_steps"], o["total_steps"]) == (
            4e-4, 1e-5, [0.9, 0.96], 0.03, 62_500, total)
        assert y["train"]["global_batch"] == 2048 and y["train"]["micro_batch_size"] == micro
        assert y["data"] == {"views": "one_per_image", "order": "epoch"}
        s = y["sampling"]
        assert (s["guidance_scale"], s["guidance_power"], s["temperature"]) == (*cfg_, 1.0)
        assert "unpublished" in text and "anneal_end" not in y.get("objective", {})
        assert ObjectiveConfig().resolve(total).anneal_end == 3 * total // 4
        assert (y["tokenizer"]["codebook_size"], y["model"]["align_z_dim"]) == (4096, 32)


def test_flops_count_the_family_blocks():
    """Forward FLOPs = 2 x (matmul params x L) + attention, independently of the formula's code."""
    cfg = family_config("rear_b_alitok")
    L, D = 274, 768
    matmul_params = 24 * (4 * D * D + 3 * D * 2048) + D * 4096
    assert flops_per_sample(cfg, include_align=False, training=False) == 2 * L * matmul_params + 24 * 4 * L * L * D
    assert flops_per_sample(cfg) > 3 * flops_per_sample(cfg, include_align=False, training=False)
    assert cfg.seq_len == 274


def test_released_file_loads_strictly(tmp_path):
    """A torch-pickle state dict in exactly the released naming (alitok_b.bin's, at a small size) loads strictly
    through the safe reader; a missing or an extra key is an error that names it."""
    from rear_ds.models.weights import WeightsError

    cfg = small_config()
    layout = released_layout(cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, cfg.codebook_size,
                             cfg.num_classes)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in layout.items()}
    path = str(tmp_path / "alitok_small.bin")
    torch.save(state, path)
    model = load_generator(path, cfg)
    assert isinstance(model, AliTokGenerator) and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.save({k: v for k, v in state.items() if k != "blocks.1.attn.k_norm.weight"}, path)
    with pytest.raises(WeightsError, match=r"missing 1 keys: blocks.1.attn.k_norm.weight"):
        load_generator(path, cfg)
    torch.save({**state, "attn_mask": torch.zeros(3, 3)}, path)  # the official non-persistent buffer
    with pytest.raises(WeightsError, match=r"(?s)AliTokGenerator\(family=alitok.*unexpected 1 keys: attn_mask"):
        load_generator(path, cfg)


# ---------------------------------------------------------------------------------------------------
# Init, RoPE, the block (spec 2.2-2.4)
# ---------------------------------------------------------------------------------------------------


def test_init_zero_output_head_gives_ln_k():
    cfg = small_config(codebook_size=4096, num_classes=1000, hidden_size=64, tok_dropout=0.1, dropout=0.1)
    torch.manual_seed(0)
    model = build_generator(cfg)
    assert model.output.weight.abs().sum() == 0 and model.output.bias.abs().sum() == 0
    assert abs(model.embeddings.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].mlp.w1.weight.std().item() - 0.02) < 0.002
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 4 * cfg.depth + 1 and all(torch.all(m.weight == 1) for m in norms)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0 and model.blocks[0].mlp.w1.bias is None
    tokens = torch.randint(0, 4096, (4, cfg.num_tokens))
    codebook = torch.randn(4096, cfg.align_z_dim)
    obj = ReARObjective(ObjectiveConfig(anneal_end=10), cfg)
    _, m = obj(model.train(), tokens, torch.tensor([0, 1, 2, 999]), codebook, step=0,
               generator=torch.Generator().manual_seed(0))
    assert m["ce"].item() == pytest.approx(math.log(4096), abs=1e-6)  # 8.3178, with every dropout on


@pytest.mark.parametrize("head_dim", [48, 80])
def test_rope_table_layout(head_dim):
    """Row 0 all zeros; rows 1..17 1-D at positions 0..16; grid (r, c): first half rotates with r + 17, second
    with c + 17, frequencies 10000^(-4j/hd) (spec 2.3), written out with math.cos / math.sin."""
    t = rope_table(17, 16, head_dim).double()
    assert t.shape == (274, head_dim // 2, 2) and torch.all(t[0] == 0)
    for p in (0, 5, 16):
        for j in (0, 3, head_dim // 2 - 1):
            a = p * 10000 ** (-2 * j / head_dim)
            assert t[1 + p, j].tolist() == pytest.approx([math.cos(a), math.sin(a)], abs=2e-6)
    for r, c in ((0, 0), (3, 11), (15, 15)):
        row = 18 + r * 16 + c
        for j in (0, 2, head_dim // 4 - 1):
            f = 10000 ** (-4 * j / head_dim)
            assert t[row, j].tolist() == pytest.approx([math.cos((r + 17) * f), math.sin((r + 17) * f)], abs=2e-6)
            q = head_dim // 4 + j
            assert t[row, q].tolist() == pytest.approx([math.cos((c + 17) * f), math.sin((c + 17) * f)], abs=2e-6)


def test_attention_norms_before_rope_and_class_token_is_zero():
    """The attention layer equals a plain computation: qkv -> per-head RMSNorm (one weight shared by the heads)
    -> RoPE on interleaved pairs -> causal softmax attention -> proj. The class position's q and k are 0."""
    cfg = small_config()
    model = randomized(build_generator(cfg, with_align_heads=False)).eval()
    attn = model.blocks[1].attn
    x = torch.randn(2, cfg.num_tokens + 1, cfg.hidden_size)
    rope = model.rope(x.device)
    B, T, D, H, hd = *x.shape, cfg.num_heads, cfg.head_dim
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).view(B, T, 3, H, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, hd)

    def rms(z, w):
        return z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-5) * w

    def rot(z):
        cos, sin = rope[:, :, 0].repeat_interleave(2, -1), rope[:, :, 1].repeat_interleave(2, -1)
        swapped = torch.stack([-z[..., 1::2], z[..., 0::2]], -1).flatten(-2)  # (-x1, x0) per pair
        return z * cos + swapped * sin

    q, k = rot(rms(q, attn.q_norm.weight)), rot(rms(k, attn.k_norm.weight))
    assert torch.all(q[:, :, 0] == 0) and torch.all(k[:, :, 0] == 0)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope), ref, rtol=1e-5, atol=1e-5)
        out = apply_rope(attn.q_norm(torch.randn(2, H, T, hd)), rope)
    assert torch.all(out[:, :, 0] == 0)


def test_bad_family_configs_are_refused():
    with pytest.raises(ConfigError, match="must be divisible by 4"):
        small_config(hidden_size=24, num_heads=4)  # head dim 6
    with pytest.raises(ConfigError, match="must be a square number"):
        small_config(num_tokens=14)
    with pytest.raises(ConfigError, match="model.prefix_tokens=4 is for model.family=alitok"):
        ModelConfig(family="rear", prefix_tokens=4).validate()
    with pytest.raises(ConfigError, match="model.family='llamagen': expected one of 'rear', 'alitok'"):
        ModelConfig(family="llamagen").validate()
    with pytest.raises(ConfigError, match="apex_layernorm=always: the alitok family has no LayerNorm"):
        AliTokGenerator.norm_layer_for(TrainConfig(apex_layernorm="always"))
    from rear_ds.config import load_config

    tiny = os.path.join(ROOT, "configs", "tiny_alitok.yaml")
    with pytest.raises(ConfigError, match="model.prefix_tokens=11 disagrees with the tokenizer 4 prefix"):
        load_config(tiny, ["model.prefix_tokens=11"])  # 11 + a 3x3 grid: also 20 tokens, another RoPE layout
    with pytest.raises(ConfigError, match="objective.perturb_prefix=False .* no effect: model.prefix_tokens=0"):
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["objective.perturb_prefix=false"])


# ---------------------------------------------------------------------------------------------------
# Parity with the official code (spec 4.2, 4.3, 4.5): goldens from tests/make_alitok_ar_goldens.py
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
    from safetensors import safe_open

    with safe_open(os.path.join(ROOT, P.GOLDEN), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture
def parity_model():
    torch.set_num_threads(1)
    cfg = P.model_config()
    model = build_generator(cfg, with_align_heads=False)
    model.load_state_dict(P.weights({k: v.shape for k, v in model.state_dict().items()}), strict=True)
    return model.eval()


def test_logits_equal_the_official_forward(golden, parity_model):
    """Full sequence, a prefix, and the null (unconditional) class, fp32 on the CPU, within 1e-5."""
    g, meta = golden
    tokens, ids = g["tokens"], g["class_ids"]
    assert json.loads(meta["model"]) == P.MODEL
    with torch.no_grad():
        full = parity_model(tokens, ids)[0]
        prefix = parity_model(tokens[:, :P.PREFIX_LEN], ids)[0]
    torch.testing.assert_close(full, g["logits_full"], rtol=0, atol=1e-5)
    torch.testing.assert_close(prefix, g["logits_prefix"], rtol=0, atol=1e-5)
    assert ids[2] == parity_model.cfg.null_class_id  # the unconditional row
    assert (full[2] - full[0]).abs().max() > 1e-2  # the rows really differ


def test_kv_cache_equals_the_official_full_recompute(golden, parity_model):
    g, _ = golden
    tokens, ids = g["tokens"], g["class_ids"]
    N = tokens.shape[1]
    cache = parity_model.new_kv_cache(tokens.shape[0])
    steps = []
    with torch.no_grad():
        for k in range(N):
            steps.append(parity_model.forward_cached(ids, cache, None if k == 0 else tokens[:, k - 1:k]))
    torch.testing.assert_close(torch.stack(steps, 1), g["logits_full"], rtol=0, atol=1e-5)


def test_cfg_distribution_per_step_equals_the_official_sampler(golden, parity_model):
    """Our CFG schedule + temperature on our KV-cache logits, teacher-forced with the tokens the official
    generate() drew, give the distribution it sampled from at every one of the 273 steps."""
    from rear_ds.sampling import cfg_weight

    g, meta = golden
    c = json.loads(meta["cfg"])
    probs, drawn = g["cfg_probs"], g["cfg_tokens"]
    N, B = drawn.shape[1], drawn.shape[0]
    m = parity_model
    labels = torch.tensor([3, 7])
    ids = torch.cat([m.class_token_ids(labels), torch.full((B,), m.cfg.null_class_id)])
    cache = m.new_kv_cache(2 * B)
    with torch.no_grad():
        for k in range(N):
            prev = None if k == 0 else drawn[:, k - 1:k].repeat(2, 1)
            logits = m.forward_cached(ids, cache, prev)
            guided = logits[B:] + cfg_weight(k, N, c["guidance_scale"], c["guidance_power"]) * (logits[:B] - logits[B:])
            torch.testing.assert_close((guided / c["temperature"]).softmax(-1), probs[k], rtol=0, atol=1e-5)
    assert cfg_weight(0, N, 4.0, 1.5) == 1.0 and cfg_weight(272, N, 4.0, 1.5) == pytest.approx(4.0, abs=1e-3)


def test_training_loss_adamw_step_lr_and_decay_groups_equal_the_official(golden, parity_model):
    """Dropouts off: the loss (our objective, regularizers off) and one AdamW step after clipping equal the
    official ARLoss + its optimizer groups; the LR schedule at 0 / 62,500 / 281,250 / 500,000 (spec 4.5)."""
    from rear_ds.training.optim import build_optimizer, lr_lambda, param_groups

    g, meta = golden
    model = parity_model.train()
    tokens, labels, drop = P.batch(model.cfg.codebook_size, model.cfg.num_classes, model.cfg.num_tokens)
    assert torch.equal(tokens, g["tokens"])
    obj = ReARObjective(ObjectiveConfig(noisy_context=False, encode_align=False, decode_align=False,
                                        class_dropout=0.0, anneal_end=10), model.cfg)
    loss, _ = obj(model, tokens, labels, torch.zeros(1, 1), step=0, drop=drop)
    assert loss.item() == pytest.approx(g["loss"].item(), abs=1e-6)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim = OptimConfig(total_steps=500_000)
    opt, _ = build_optimizer(model, optim, torch.device("cpu"), offload=False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    close = total = 0
    for k, v in model.named_parameters():
        # The first Adam step is lr * g / (|g| + eps): where |g| is near eps (1e-8) float rounding in the gradient
        # moves it, so the bound is 0.5% of the 4e-4 step ("within bf16 noise", spec 4.5); nearly all agree to 2e-7.
        diff = (v.detach() - before[k] - g[f"delta.{k}"]).abs()
        assert diff.max() < 2e-6, (k, diff.max().item())
        close, total = close + int((diff < 2e-7).sum()), total + diff.numel()
    assert close / total > 0.999
    names = {id(p): n for n, p in model.named_parameters()}
    ours = sorted(names[id(p)] for p in param_groups(model, 0.03)[1]["params"])
    assert ours == json.loads(meta["no_decay"])
    want = json.loads(meta["lr"])
    for s in P.LR_STEPS:
        got = optim.lr * lr_lambda(s, optim.warmup_steps, optim.total_steps, optim.lr, optim.end_lr)
        assert got == pytest.approx(want[str(s)], rel=1e-12, abs=1e-15)
    assert want["281250"] == pytest.approx(2.05e-4) and want["500000"] == pytest.approx(1e-5)


# ---------------------------------------------------------------------------------------------------
# Sampling through the shared sampler
# ---------------------------------------------------------------------------------------------------


def test_sampler_kv_cache_and_recompute_agree_per_index():
    from rear_ds.config import SamplingConfig
    from rear_ds.sampling import generate

    cfg = small_config()
    model = randomized(build_generator(cfg, with_align_heads=False)).eval()
    s = SamplingConfig(guidance_scale=3.0, guidance_power=1.0)
    labels, idx = torch.tensor([0, 1, 4]), torch.tensor([10, 11, 12])
    kv = generate(model, labels, idx, 5, s)
    s.kv_cache = False
    assert torch.equal(generate(model, labels, idx, 5, s), kv)
    s.kv_cache = True
    assert torch.equal(generate(model, labels[1:], idx[1:], 5, s), kv[1:])  # sample i depends on (seed, i) only
    assert kv.shape == (3, cfg.num_tokens) and kv.max() < cfg.codebook_size


# ---------------------------------------------------------------------------------------------------
# reAR on the family (spec 3.2, 4.6)
# ---------------------------------------------------------------------------------------------------


def plain_terms(model, tokens, noisy, mask, class_ids, codebook, align_prefix=True):
    """Spec 3.2 in plain PyTorch from the block outputs: CE at p = 0..N-1 vs clean t; encode head on block 0 at
    p = 1..N vs cb[t], weighted by (1 - m); decode head on block d at p = 0..N-1 vs cb[t]; sums / (B N)."""
    outs = {}
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(model.blocks)]
    logits, _, _ = model(noisy, class_ids)
    for h in hooks:
        h.remove()
    B, N = tokens.shape
    P_, d = model.cfg.prefix_tokens, model.cfg.decode_align_layer
    ce = F.cross_entropy(logits.reshape(B * N, -1), tokens.reshape(-1))
    target = codebook[tokens]
    w = torch.ones(B, N)
    if not align_prefix:
        w[:, :P_] = 0
    enc = F.cosine_similarity(model.encode_align_mlp(outs[0][:, 1:N + 1]), target, dim=-1)
    dec = F.cosine_similarity(model.decode_align_mlp(outs[d][:, 0:N]), target, dim=-1)
    return ce, -(w * (~mask).float() * enc).sum() / (B * N), -(w * dec).sum() / (B * N)


def test_rear_terms_equal_a_plain_computation_and_reach_the_right_blocks():
    cfg = small_config()
    model = randomized(build_generator(cfg)).train()  # dropouts are 0 in small_config
    B, N, K = 3, cfg.num_tokens, cfg.codebook_size
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, K, (B, N), generator=g)
    mask = torch.rand(B, N, generator=g) < 0.3
    mask[0, 1] = True  # a prefix position is perturbed (perturb_prefix defaults to true)
    noisy = torch.where(mask, torch.randint(0, K, (B, N), generator=g), tokens)
    labels, drop = torch.tensor([0, 2, 4]), torch.tensor([False, True, False])
    codebook = torch.randn(K, cfg.align_z_dim, generator=g)
    obj = ReARObjective(ObjectiveConfig(class_dropout=0.0, anneal_end=10), cfg)
    loss, m = obj(model, tokens, labels, codebook, step=0, noisy_tokens=noisy, noise_mask=mask, drop=drop)
    ce, enc, dec = plain_terms(model, tokens, noisy, mask, model.class_token_ids(labels, drop), codebook)
    for got, want in ((m["ce"], ce), (m["enc_align"], enc), (m["dec_align"], dec)):
        assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert loss.item() == pytest.approx((ce + enc + dec).item(), abs=1e-6)  # lambda = 1

    d = cfg.decode_align_layer

    def grads_of(term):
        model.zero_grad(set_to_none=True)
        term.backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    _, enc, dec = plain_terms(model, tokens, noisy, mask, model.class_token_ids(labels, drop), codebook)
    got = grads_of(enc)
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "") for n in got} == {
        "embeddings", "blocks.0", "encode_align_mlp"}
    _, enc, dec = plain_terms(model, tokens, noisy, mask, model.class_token_ids(labels, drop), codebook)
    got = grads_of(dec)
    blocks = {int(n.split(".")[1]) for n in got if n.startswith("blocks.")}
    assert blocks == set(range(d + 1)) and "embeddings.weight" in got and "norm.weight" not in got
    assert not any(n.startswith(("output", "encode_align_mlp")) for n in got)


def test_prefix_switches():
    """perturb_prefix=false leaves t_0..t_{P-1} clean (the draws are the same); align_prefix=false drops them from
    both sums (the denominator stays B*N)."""
    cfg = small_config()
    model = randomized(build_generator(cfg)).train()
    B, N, K, P_ = 64, cfg.num_tokens, cfg.codebook_size, cfg.prefix_tokens
    tokens = torch.randint(0, K, (B, N), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(B, dtype=torch.long)
    codebook = torch.randn(K, cfg.align_z_dim)
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].clone()))
    for perturb_prefix in (True, False):
        obj = ReARObjective(ObjectiveConfig(class_dropout=0.0, anneal_end=10, perturb_prefix=perturb_prefix), cfg)
        _, m = obj(model, tokens, labels, codebook, step=0, generator=torch.Generator().manual_seed(1))
    hook.remove()
    on, off = calls
    assert (on[:, :P_] != tokens[:, :P_]).any() and torch.equal(off[:, :P_], tokens[:, :P_])
    assert torch.equal(on[:, P_:], off[:, P_:])  # the grid's perturbation is the same draw
    mask = on != tokens
    obj = ReARObjective(ObjectiveConfig(class_dropout=0.0, anneal_end=10, align_prefix=False), cfg)
    _, m = obj(model, tokens, labels, codebook, step=0, noisy_tokens=on, noise_mask=mask)
    _, enc, dec = plain_terms(model, tokens, on, mask, model.class_token_ids(labels), codebook, align_prefix=False)
    assert m["enc_align"].item() == pytest.approx(enc.item(), abs=1e-6)
    assert m["dec_align"].item() == pytest.approx(dec.item(), abs=1e-6)


def test_noise_anneal_of_the_recipe():
    """rho(s) = max(0, 1 - s / s1) with s1 = 0.75 x 500k = 375,000 (spec 3.2, 4.6): 1 / 0.5 / 0, and the expected
    corrupted fraction is rho / 2; the class token is never perturbed (it is not among the N tokens)."""
    o = ObjectiveConfig().resolve(500_000)
    assert o.anneal_end == 375_000
    assert [rho_schedule(s, o.anneal_start, o.anneal_end) for s in (0, 187_500, 375_000)] == [1.0, 0.5, 0.0]
    cfg = small_config(codebook_size=64, num_classes=1000, num_tokens=273, prefix_tokens=17)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.seen = cfg, []

        def class_token_ids(self, labels, drop=None):
            return AliTokGenerator.class_token_ids(self, labels, drop)

        def forward(self, tokens, class_ids, encode_align=False, decode_align=False):
            self.seen.append((tokens, class_ids))
            B, N = tokens.shape
            return torch.zeros(B, N, 64), torch.ones(B, N, 8), torch.ones(B, N, 8)

    rec = Recorder()
    obj = ReARObjective(o, cfg)
    tokens, labels = torch.randint(0, 64, (1000, 273)), torch.arange(1000)
    _, m = obj(rec, tokens, labels, torch.randn(64, 8), step=187_500, generator=torch.Generator().manual_seed(0))
    assert m["rho"].item() == 0.5 and abs(m["noise_frac"].item() - 0.25) < 0.015
    noisy, class_ids = rec.seen[0]
    assert noisy.shape == tokens.shape and (class_ids >= 65).all()  # class ids are untouched
