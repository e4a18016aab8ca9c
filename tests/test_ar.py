"""ARGenerator (LARP llama-abs): config presets, teacher-forced vs cached logits, loss, checkpoints, LARP keys."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_ref
from safetensors.torch import save_file

from dera_fast.convert.larp_ar import config_from_larp, convert_state_dict, from_larp_ar
from dera_fast.models.ar import ARGenerator, GeneratorConfig


def make(fp=False, **kw):
    cfg = GeneratorConfig.from_name("tiny", frame_prediction=fp, **kw)
    model = ARGenerator(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.3)  # the zero-init head would make every logit 0
    return model


@pytest.mark.parametrize("name,params", [("B", 98.40), ("L", 326.26), ("LP", 631.98)])
def test_preset_sizes_match_larp(name, params):
    with torch.device("meta"):
        model = ARGenerator(GeneratorConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.01)


def test_config_roundtrip_and_errors():
    cfg = GeneratorConfig.from_name("LP", frame_prediction=True)
    assert cfg.cls_token_num == 1025 and cfg.pe_len == 2048 and cfg.embed_vocab == 8193 and cfg.hidden_dim == 3584
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="preset"):
        GeneratorConfig.from_name("XXL")
    with pytest.raises(ValueError, match="cls_token_num"):
        GeneratorConfig(frame_prediction=True)
    with pytest.raises(ValueError, match="unknown"):
        GeneratorConfig.from_dict({"dims": 3})


def test_zero_init_head_and_loss():
    model = ARGenerator(GeneratorConfig.from_name("tiny")).eval()
    ids = torch.randint(0, 64, (3, 16))
    logits = model(ids[:, :-1], class_labels=torch.tensor([0, 1, 4]))
    assert logits.shape == (3, 16, 64) and not logits.any()
    assert model.loss(ids, torch.tensor([0, 1, 4])).item() == pytest.approx(torch.log(torch.tensor(64.0)).item())


def test_class_dropout_uses_null_class():
    model = make(class_dropout_prob=1.0, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    ids, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    model.train()
    dropped = model.loss(ids, labels)
    model.eval()
    assert torch.allclose(dropped, model.loss(ids, torch.full_like(labels, 5)))
    assert not torch.allclose(dropped, model.loss(ids, labels))


@pytest.mark.parametrize("fp", [False, True], ids=["class", "frame-pred"])
@pytest.mark.parametrize("kv_block", [2, 5, 64], ids=["blk2", "blk5", "blk64"])
def test_cached_decode_equals_full_forward(fp, kv_block):
    model = make(fp)
    cfg = model.config
    ids = torch.randint(0, 64, (2, cfg.max_seq_len))
    if fp:
        cond = dict(context_ids=torch.randint(0, 64, (2, cfg.context_len)))
    else:
        cond = dict(class_labels=torch.tensor([0, 3]))
    full = model(ids[:, :-1], **cond)  # [2, L, V]
    with torch.no_grad():
        model.setup_caches(2, cfg.pe_len + kv_block)  # stale slots past the prefix must be masked out
        for blk in model.blocks:
            blk.attn.kv_cache.k_cache.normal_()
        step = [model.prefill(model.embed_cond(**cond))]
        for t in range(cfg.max_seq_len - 1):
            pos = cfg.cls_token_num + t
            n = min(-(-(pos + 1) // kv_block) * kv_block, model.cache_len)
            step.append(model.decode_step(ids[:, t:t + 1], torch.tensor([pos]), model.kv_positions[:n]))
    torch.testing.assert_close(torch.stack(step, 1), full, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip(tmp_path):
    model = make(True)
    model.save_pretrained(tmp_path)
    back = ARGenerator.from_pretrained(tmp_path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    (tmp_path / "config.json").unlink()  # the safetensors metadata carries the config too
    assert ARGenerator.from_pretrained(tmp_path / "model.safetensors").config == model.config


# ---------------------------------------------------------------------------------------------------------------
# LARP_AR checkpoints
# ---------------------------------------------------------------------------------------------------------------
def larp_state_dict(dim, n_layer, hidden, vocab, pe_len, num_classes=None, fp=False, device="cpu"):
    """A random state dict with LARP_AR's exact key names and shapes (models/larp_ar.py)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * 0.1

    sd = {"tok_embeddings.weight": r(vocab + fp, dim), "abs_pe": r(1, pe_len, dim),
          "norm.weight": 1 + r(dim), "output.weight": r(vocab, dim)}
    if not fp:
        sd["cls_embedding.embedding_table.weight"] = r(num_classes + 1, dim)
    for i in range(n_layer):
        p = f"layers.{i}."
        sd |= {p + "attention.wqkv.weight": r(3 * dim, dim), p + "attention.wo.weight": r(dim, dim),
               p + "feed_forward.w1.weight": r(hidden, dim), p + "feed_forward.w3.weight": r(hidden, dim),
               p + "feed_forward.w2.weight": r(dim, hidden), p + "attention_norm.weight": 1 + r(dim),
               p + "ffn_norm.weight": 1 + r(dim)}
    return sd


def larp_logits(sd, n_head, cond_idx, idx, fp):
    """LARP_AR's training forward written out on its raw state dict (SPEC.md §4.1), eps 1e-5."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    if fp:
        cond = F.embedding(cond_idx, sd["tok_embeddings.weight"])
    else:
        cond = F.embedding(cond_idx, sd["cls_embedding.embedding_table.weight"])[:, None]
    h = torch.cat([cond, F.embedding(idx, sd["tok_embeddings.weight"])], 1)
    h = h + sd["abs_pe"][:, : h.shape[1]]
    b, n, d = h.shape
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))):
        p = f"layers.{i}."
        qkv = rms(h, sd[p + "attention_norm.weight"]) @ sd[p + "attention.wqkv.weight"].T
        q, k, v = (t.view(b, n, n_head, -1).transpose(1, 2) for t in qkv.split(d, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        h = h + a @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    logits = rms(h, sd["norm.weight"]) @ sd["output.weight"].T
    return logits[:, cond.shape[1] - 1:]


@pytest.mark.parametrize("fp", [False, True], ids=["class", "frame-pred"])
@pytest.mark.parametrize("layout", ["flat", "nested", "no-config"])
def test_from_larp_ar_identical_logits(tmp_path, fp, layout):
    n_head = 6  # dim 384 is LARP's llama-abs-S width, so the head count can be inferred without a config
    max_len = 8
    pe_len = 2 * max_len if fp else max_len
    sd = larp_state_dict(384, 2, 1024, 64, pe_len, num_classes=5, fp=fp)
    args = dict(dim=384, n_layer=2, n_head=n_head, vocab_size=64, num_classes=5, max_seq_len=max_len,
                cls_token_num=max_len + 1 if fp else 1, frame_prediction=fp, n_kv_head=None,
                ffn_dim_multiplier=None, multiple_of=256, rope_base=10000, use_fixed_pe=False, max_batch_size=32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    if layout != "no-config":
        (tmp_path / "config.json").write_text(json.dumps(args if layout == "flat" else {"config": args}))
    model = from_larp_ar(tmp_path).eval()
    assert model.config.frame_prediction == fp and model.config.max_seq_len == max_len
    idx = torch.randint(0, 64, (2, max_len - 1))
    if fp:
        ctx = torch.randint(0, 64, (2, max_len))
        ref = larp_logits(sd, n_head, torch.cat([ctx, torch.full((2, 1), 64)], 1), idx, fp)
        out = model(idx, context_ids=ctx)
    else:
        labels = torch.tensor([0, 4])
        ref = larp_logits(sd, n_head, labels, idx, fp)
        out = model(idx, class_labels=labels)
    assert_close_to_ref("logits", out, ref, None, floor=1e-5)


@pytest.mark.parametrize("fp", [False, True], ids=["class", "frame-pred"])
def test_larp_lp_keys_and_shapes(fp):
    """LARP-L-long-AR(-FP) (llama-abs-LP, UCF-101 / K600) maps key for key onto the LP preset (meta tensors)."""
    sd = larp_state_dict(1280, 30, 3584, 8192, 2048 if fp else 1024, num_classes=101, fp=fp, device="meta")
    sd["layers.0.attention.kv_cache.k_cache"] = torch.empty(1, device="meta")  # sampling state LARP may save
    cfg = config_from_larp({}, sd)
    assert cfg == GeneratorConfig.from_name("LP", frame_prediction=fp)
    with torch.device("meta"):
        model = ARGenerator(cfg)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in convert_state_dict(sd).items()} == ours


def test_larp_bad_keys():
    sd = larp_state_dict(384, 1, 1024, 64, 8, num_classes=5, device="meta")
    sd["layers.0.attention.rope.freqs"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match="unexpected LARP_AR keys"):
        convert_state_dict(sd)
    with pytest.raises(ValueError, match="unsupported"):
        config_from_larp({"n_head": 6, "n_kv_head": 2}, sd)
