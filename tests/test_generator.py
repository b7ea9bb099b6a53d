"""The reAR generator: sizes, checkpoint layout, init, input construction, KV cache (spec section 2)."""

import pytest
import torch

from rear_ds.config import ConfigError, ModelConfig, load_config
from rear_ds.models import count_parameters, flops_per_sample
from rear_ds.models.generator import ReARGenerator


@pytest.mark.parametrize("name,inference_m,train_m", [
    ("rear_s", 218.4, 231.0), ("rear_b", 260.9, 273.5), ("rear_l", 461.7, 475.3)])
def test_released_sizes(name, inference_m, train_m):
    cfg = load_config(f"configs/{name}.yaml")
    assert round(count_parameters(cfg.model) / 1e6, 1) == inference_m
    assert round(count_parameters(cfg.model, include_align=True) / 1e6, 1) == train_m


@pytest.mark.parametrize("name,low,high", [
    ("rear_1b", 0.9e9, 1.2e9), ("rear_1p5b", 1.4e9, 1.6e9), ("rear_3b", 2.8e9, 3.3e9), ("rear_7b", 6.5e9, 7.5e9)])
def test_scaling_sizes(name, low, high):
    cfg = load_config(f"configs/{name}.yaml")
    n = count_parameters(cfg.model)
    assert low < n < high
    assert cfg.model.decode_align_layer == (3 * cfg.model.depth) // 4  # 3/4 depth


def test_flops_match_the_papers_estimate():
    cfg = load_config("configs/rear_l.yaml")
    assert 7.3e11 < flops_per_sample(cfg.model) < 7.6e11  # spec section 11: about 7.4e11


def expected_keys(depth, align=True):
    """The released reAR key layout (spec 2.8), written out independently of the model code."""
    keys = ["cls_token", "embeddings.weight", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings",
            "adaln_before_head.adaLN_modulation.1.weight", "adaln_before_head.adaLN_modulation.1.bias",
            "lm_head.weight", "lm_head.bias"]
    for i in range(depth):
        for m in ("norm1", "norm2", "attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj", "mlp.fc1", "mlp.fc2",
                  "adaLN_modulation.1"):
            keys += [f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"]
    if align:
        for h in ("encode_align_mlp", "decode_align_mlp"):
            for j in (0, 2, 4):
                keys += [f"{h}.{j}.weight", f"{h}.{j}.bias"]
    return set(keys)


def test_state_dict_layout_and_shapes():
    cfg = load_config("configs/rear_l.yaml").model
    with torch.device("meta"):
        m = ReARGenerator(cfg)
    sd = m.state_dict()
    assert set(sd) == expected_keys(24)
    D = 1024
    assert sd["cls_token"].shape == (1, 1, D)
    assert sd["embeddings.weight"].shape == (2026, D)
    assert sd["pos_embed"].shape == (1, 1280, D)
    assert sd["target_aware_pos_embed"].shape == (1, 1280, D)
    assert sd["timesteps_embeddings"].shape == (1, 356, D)
    assert sd["blocks.0.attn.q_norm.weight"].shape == (64,)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * D, D)
    assert sd["encode_align_mlp.4.weight"].shape == (256, 2048)
    assert set(m.inference_state_dict()) == expected_keys(24, align=False)


def test_init(tiny_cfg):
    torch.manual_seed(0)
    m = ReARGenerator(tiny_cfg.model)
    for blk in m.blocks:
        assert blk.adaLN_modulation[1].weight.abs().sum() == 0 and blk.adaLN_modulation[1].bias.abs().sum() == 0
    assert m.adaln_before_head.adaLN_modulation[1].weight.abs().sum() == 0
    assert m.lm_head.weight.std() > 0.01  # lm_head is NOT zero-initialised
    assert m.cls_token.abs().sum() == 0
    assert abs(m.pos_embed.std().item() - 0.02) < 0.005
    assert torch.all(m.blocks[0].norm1.weight == 1) and torch.all(m.blocks[0].attn.q_norm.bias == 0)
    assert m.blocks[0].attn.qkv.bias.abs().sum() == 0
    # adaLN-Zero: every block is the identity at init, so the head sees LN(x) of the embeddings.
    B, N = 2, tiny_cfg.model.num_tokens
    toks = torch.randint(0, 64, (B, N))
    ids = m.class_token_ids(torch.tensor([1, 2]))
    m.eval()
    x, cond = m._embed(torch.cat([ids[:, None], toks], 1), 0, ids, with_cls=True)
    h = x
    for blk in m.blocks:
        h = blk(h, torch.nn.functional.silu(cond))
    torch.testing.assert_close(h, x)


def test_token_space(tiny_cfg):
    m = ReARGenerator(tiny_cfg.model)
    K, C = 64, 10
    assert m.cfg.mask_token_id == K and m.cfg.null_class_id == K + 1 + C and m.cfg.vocab_size == K + C + 2
    ids = m.class_token_ids(torch.tensor([0, 9, 3]), drop=torch.tensor([False, False, True]))
    assert ids.tolist() == [K + 1, K + 1 + 9, K + 1 + C]


def test_input_and_condition_construction(tiny_model):
    """x_p = E[id] + P[p] + T[p] with the target-aware row offset by one; c_p = E[class] + S[p]."""
    m = tiny_model
    N = m.cfg.num_tokens
    toks = torch.randint(0, 64, (1, N))
    cid = m.class_token_ids(torch.tensor([3]))
    x, cond = m._embed(torch.cat([cid[:, None], toks], 1), 0, cid, with_cls=True)
    E, P, A, S = m.embeddings.weight, m.pos_embed[0], m.target_aware_pos_embed[0], m.timesteps_embeddings[0]
    torch.testing.assert_close(x[0, 0], m.cls_token[0, 0] + P[0])  # cls: no target-aware term
    torch.testing.assert_close(x[0, 1], E[cid[0]] + P[1] + A[2])  # class position predicts t_0 -> row of t_0
    for i in (0, 5, N - 2):
        torch.testing.assert_close(x[0, 2 + i], E[toks[0, i]] + P[2 + i] + A[3 + i])
    torch.testing.assert_close(x[0, N + 1], E[toks[0, N - 1]] + P[N + 1])  # last position: no target
    for p in (0, 1, N + 1):
        torch.testing.assert_close(cond[0, p], E[cid[0]] + S[p])


def test_final_layer_chunk_order(tiny_model):
    """Final adaLN chunks are (scale, shift): the opposite of the blocks' (shift, scale, gate, ...)."""
    fl = tiny_model.adaln_before_head
    D = tiny_model.cfg.hidden_size
    with torch.no_grad():
        fl.adaLN_modulation[1].weight.zero_()
        fl.adaLN_modulation[1].bias.copy_(torch.cat([torch.full((D,), 2.0), torch.full((D,), 5.0)]))
    x = torch.randn(1, 3, D)
    out = fl(x, torch.nn.functional.silu(torch.zeros(1, 3, D)))
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (D,), eps=1e-6) * 3.0 + 5.0)


def test_logits_and_align_slices(tiny_model):
    """Logits come from positions 1..N; the encode head sees p = 2..N+1 of block e, the decode head p = 1..N of d."""
    m = tiny_model
    N = m.cfg.num_tokens
    outs = {}
    m.blocks[m.cfg.encode_align_layer].register_forward_hook(lambda mod, i, o: outs.__setitem__("e", o))
    m.blocks[m.cfg.decode_align_layer].register_forward_hook(lambda mod, i, o: outs.__setitem__("d", o))
    m.blocks[-1].register_forward_hook(lambda mod, i, o: outs.__setitem__("last", o))
    toks = torch.randint(0, 64, (2, N))
    cid = m.class_token_ids(torch.tensor([1, 2]))
    logits, enc, dec = m(toks, cid, encode_align=True, decode_align=True)
    assert logits.shape == (2, N, 64) and enc.shape == (2, N, 16) and dec.shape == (2, N, 16)
    torch.testing.assert_close(enc, m.encode_align_mlp(outs["e"])[:, 2:N + 2])
    torch.testing.assert_close(dec, m.decode_align_mlp(outs["d"])[:, 1:N + 1])
    _, cond = m._embed(torch.cat([cid[:, None], toks], 1), 0, cid, with_cls=True)
    ref = m.lm_head(m.adaln_before_head(outs["last"], torch.nn.functional.silu(cond)))[:, 1:N + 1]
    torch.testing.assert_close(logits, ref)


def test_causality(tiny_model):
    """Changing token t_j must not change the logits at positions that come before it."""
    m = tiny_model
    N = m.cfg.num_tokens
    toks = torch.randint(0, 64, (1, N))
    cid = m.class_token_ids(torch.tensor([4]))
    a = m(toks, cid)[0]
    toks2 = toks.clone()
    toks2[0, 7] = (toks2[0, 7] + 1) % 64
    b = m(toks2, cid)[0]
    torch.testing.assert_close(a[:, :8], b[:, :8])  # logits 0..7 predict t_0..t_7 from t_<=6
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_kv_cache_equals_full_recompute(tiny_model):
    m = tiny_model.double()  # fp64 here, and fp32 below, both within 1e-5
    N = m.cfg.num_tokens
    for dtype in (torch.float64, torch.float32):
        m = m.to(dtype)
        toks = torch.randint(0, 64, (3, N))
        cid = m.class_token_ids(torch.tensor([1, 2, 3]))
        full = m(toks, cid)[0]
        cache = m.new_kv_cache(3)
        steps = [m.forward_cached(cid, cache)]
        for k in range(1, N):
            steps.append(m.forward_cached(cid, cache, toks[:, k - 1:k]))
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
        # Prefix recompute (how the reference sampler runs) agrees with both.
        for k in (0, 5):
            torch.testing.assert_close(m(toks[:, :k], cid)[0][:, k], full[:, k], atol=1e-5, rtol=0)


def test_activation_checkpointing_same_loss_and_grads(tiny_cfg):
    torch.manual_seed(0)
    m = ReARGenerator(tiny_cfg.model)
    toks = torch.randint(0, 64, (2, 16))
    cid = m.class_token_ids(torch.tensor([1, 2]))
    grads = []
    for mode in ("off", "all", "every_k"):
        m.set_activation_checkpointing(mode, 2)
        m.zero_grad()
        torch.manual_seed(1)  # same dropout masks
        logits, enc, dec = m(toks, cid, encode_align=True, decode_align=True)
        (logits.logsumexp(-1).mean() + enc.sum() + dec.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_align_layer_out_of_range_rejected():
    with pytest.raises(ConfigError, match="decode_align_layer=20 is outside the model"):
        ModelConfig(hidden_size=64, depth=20, num_heads=4, mlp_dim=128, decode_align_layer=20).validate()


def test_model_info_cli(capsys):
    from rear_ds.model_info import main

    main(["configs/rear_b.yaml", "--world-size", "4"])
    out = capsys.readouterr().out
    assert "260.9M" in out and "273.5M" in out and "FLOPs per training sample" in out
    assert "per process with 4 processes" in out and "bf16_autocast" in out


def test_memory_plan_matches_measured_deepspeed_state():
    """model_info's bytes-per-parameter model against what bench/zero_memory.py measured on real DeepSpeed
    engines (the committed CPU results: 2 processes, bf16 and fp32 weights, ZeRO-0..3), within 3%."""
    import glob
    import json
    import os

    from rear_ds.model_info import state_bytes_per_param

    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    files = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "cpu_*.json")))
    # section runs (bench/run.py --only ...) record the others as skipped: take the latest that ran ZeRO
    files = [f for f in files if "param_count" in json.load(open(f)).get("sections", {}).get("zero", {})]
    assert files, "no committed CPU benchmark that ran the ZeRO section"
    zero = json.load(open(files[-1]))["sections"]["zero"]
    n, params = zero["world_size"], zero["param_count"]
    # bf16_autocast holds what fp32 holds (fp32 weights, grads and optimizer); older result files lack its rows
    autocast_rows = "bf16_autocast" if "bf16_autocast" in zero["summary"] else "fp32"
    for bench_prec, prec in (("bf16", "bf16"), (autocast_rows, "bf16_autocast")):
        for stage in range(4):
            measured = zero["summary"][bench_prec][f"zero{stage}"]["params_grads_optimizer_bytes_max_rank"]
            if stage == 1:  # measured after the step, when ZeRO-1 has reduced its gradients into partitions
                b = state_bytes_per_param(prec, 2, n)
            else:
                b = state_bytes_per_param(prec, stage, n)
            model = params * sum(b.values())
            assert abs(model - measured) / measured < 0.03, (prec, stage, model, measured)


def test_released_checkpoint_loads_strictly(tmp_path, tiny_cfg, tiny_model):
    """A file in the released layout (safetensors, with or without align heads) loads; others fail clearly."""
    from safetensors.torch import save_file

    from rear_ds.models import load_generator
    from rear_ds.models.weights import WeightsError

    full = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(full, str(tmp_path / "with_heads.safetensors"))
    save_file(tiny_model.inference_state_dict(), str(tmp_path / "no_heads.safetensors"))
    for name in ("with_heads", "no_heads"):
        m = load_generator(str(tmp_path / f"{name}.safetensors"), tiny_cfg.model)
        torch.testing.assert_close(m.lm_head.weight, tiny_model.lm_head.weight)
        assert not hasattr(m, "encode_align_mlp")
    m = load_generator(str(tmp_path / "with_heads.safetensors"), tiny_cfg.model, with_align_heads=True)
    torch.testing.assert_close(m.decode_align_mlp[4].weight, tiny_model.decode_align_mlp[4].weight)
    # Another architecture: the error names the offending keys and the config that was expected.
    bad = dict(full)
    bad.pop("blocks.3.mlp.fc1.weight")
    bad["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_generator(str(tmp_path / "bad.safetensors"), tiny_cfg.model)
    msg = str(e.value)
    assert "blocks.3.mlp.fc1.weight" in msg and "blocks.9.attn.qkv.weight" in msg and "depth=4" in msg
    # A torch .bin state dict loads too (weights_only).
    torch.save(tiny_model.inference_state_dict(), tmp_path / "plain.bin")
    assert load_generator(str(tmp_path / "plain.bin"), tiny_cfg.model).cfg.depth == 4


def test_layernorm_choice_keeps_reference_numerics():
    """apex's fused LayerNorm (optional) only where it cannot change the numerics or break a compiled graph;
    whatever the choice, the state dict is the same (checkpoints move between machines with and without apex)."""
    from torch import nn

    from rear_ds.config import ConfigError, TrainConfig, load_config
    from rear_ds.models.generator import ReARGenerator, apex_layernorm
    from rear_ds.models.generator import choose_layernorm

    class FakeApex(nn.LayerNorm):
        pass

    def pick(**kw):
        return choose_layernorm(TrainConfig(**kw), FakeApex)[0]

    assert pick(precision="bf16") is FakeApex and pick(precision="fp16") is FakeApex
    assert pick(precision="bf16_autocast") is nn.LayerNorm and pick(precision="fp32") is nn.LayerNorm
    assert pick(precision="bf16", compile=True) is nn.LayerNorm
    assert pick(precision="bf16", apex_layernorm="never") is nn.LayerNorm
    assert pick(precision="bf16_autocast", apex_layernorm="always") is FakeApex
    assert choose_layernorm(TrainConfig(precision="bf16"), None) == (nn.LayerNorm, "apex not installed")
    with pytest.raises(ConfigError, match="train.apex_layernorm='fast'"):
        load_config("configs/tiny.yaml", ["train.apex_layernorm=fast"])
    if apex_layernorm() is None:
        with pytest.raises(ConfigError, match="train.apex_layernorm=always but NVIDIA apex"):
            load_config("configs/tiny.yaml", ["train.apex_layernorm=always"])
    cfg = load_config("configs/tiny.yaml").model
    plain, fused = ReARGenerator(cfg), ReARGenerator(cfg, norm_layer=FakeApex)
    assert isinstance(fused.blocks[0].attn.q_norm, FakeApex) and isinstance(fused.blocks[-1].norm2, FakeApex)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
