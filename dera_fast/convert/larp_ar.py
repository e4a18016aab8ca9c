"""Load an official LARP AR checkpoint (hywang66/LARP ``LARP_AR``, "llama-abs") as a dera_fast `ARGenerator`.

Layout read: what LARP's ``PyTorchModelHubMixin.save_pretrained`` writes, i.e. a directory with ``config.json``
(the ``ModelArgs`` dataclass fields, flat, or nested under ``"config"``) and ``model.safetensors`` (the state
dict); a ``.safetensors`` path with ``config.json`` beside it works too. Without a config, sizes are inferred from
the weight shapes (heads from LARP's preset table). Keys are renamed (table below); logits are identical.
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file
from torch import Tensor

from dera_fast.models.ar import ARGenerator, GeneratorConfig
from dera_fast.models.pretrained import rename_key

# LARP key regex -> dera_fast key template
KEY_MAP = [
    (r"tok_embeddings\.weight", r"tok_emb.weight"),
    (r"cls_embedding\.embedding_table\.weight", r"cls_emb.weight"),
    (r"abs_pe", r"pos_emb"),
    (r"layers\.(\d+)\.attention\.(wqkv|wo)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"norm\.weight", r"norm.weight"),
    (r"output\.weight", r"head.weight"),
]
# Sampling-time state LARP may have saved alongside the weights (KV caches); never weights.
IGNORED = re.compile(r"layers\.\d+\.attention\.kv_cache\.(k|v)_cache|causal_mask")
# LARP's llama-abs presets: dim -> n_head (models/larp_ar.py)
HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1280: 20, 1536: 24, 2560: 40}


def convert_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a LARP_AR state dict to ARGenerator keys ([1, P, dim] abs_pe -> [P, dim] pos_emb)."""
    out, unknown = {}, []
    for key, value in sd.items():
        if IGNORED.fullmatch(key):
            continue
        new = rename_key(key, KEY_MAP)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"unexpected LARP_AR keys (not a llama-abs checkpoint?): {unknown[:8]}")
    if "pos_emb" in out:
        out["pos_emb"] = out["pos_emb"].reshape(-1, out["pos_emb"].shape[-1])
    return out


def config_from_larp(args: dict, sd: dict[str, Tensor]) -> GeneratorConfig:
    """GeneratorConfig from LARP ``ModelArgs`` fields (may be empty) checked against the weight shapes."""
    args = dict(args.get("config", args))
    dim = sd["tok_embeddings.weight"].shape[1]
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    vocab = sd["output.weight"].shape[0]
    fp = "cls_embedding.embedding_table.weight" not in sd
    pe_len = sd["abs_pe"].shape[-2]
    bad = [f"{k}={args[k]!r}" for k, ok in (("n_kv_head", lambda v: v in (None, args.get("n_head"))),
                                             ("ffn_dim_multiplier", lambda v: v is None))
           if k in args and not ok(args[k])]
    if bad:
        raise ValueError(f"unsupported LARP_AR options: {', '.join(bad)}")
    n_head = args.get("n_head", HEADS_BY_DIM.get(dim))
    if n_head is None:
        raise ValueError(f"n_head unknown for dim={dim}: pass a config.json")
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    num_classes = args.get("num_classes", 101)
    if not fp:
        rows = sd["cls_embedding.embedding_table.weight"].shape[0]
        num_classes = args.get("num_classes", rows - 1)
        if rows != num_classes + 1:
            raise ValueError(f"class embedding has {rows} rows for {num_classes} classes: no null class "
                             "(class_dropout_prob=0 checkpoints cannot do classifier-free guidance)")
    multiple_of = args.get("multiple_of", 256)
    if fp:  # pe_len = max_seq_len + cls_token_num - 1; LARP's K600 layout: cls_token_num = max_seq_len + 1
        if "cls_token_num" in args:
            max_seq_len = pe_len + 1 - args["cls_token_num"]
        else:
            max_seq_len = args.get("max_seq_len", pe_len // 2)
        cls_token_num = pe_len + 1 - max_seq_len
    else:
        cls_token_num, max_seq_len = 1, pe_len
    cfg = GeneratorConfig(
        dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab,
        num_classes=num_classes,
        max_seq_len=max_seq_len, frame_prediction=fp, cls_token_num=cls_token_num,
        class_dropout_prob=args.get("class_dropout_prob", 0.1), multiple_of=multiple_of,
        norm_eps=args.get("norm_eps", 1e-5), token_dropout_p=args.get("token_dropout_p", 0.1),
        resid_dropout_p=args.get("resid_dropout_p", 0.1), ffn_dropout_p=args.get("ffn_dropout_p", 0.1),
        initializer_range=args.get("initializer_range", 0.02))
    if cfg.hidden_dim != hidden or cfg.embed_vocab != sd["tok_embeddings.weight"].shape[0]:
        raise ValueError(f"config does not match the weights: hidden {cfg.hidden_dim} vs {hidden}, token rows "
                         f"{cfg.embed_vocab} vs {sd['tok_embeddings.weight'].shape[0]}")
    return cfg


def from_larp_ar(path: str | os.PathLike, device: str | torch.device = "cpu") -> ARGenerator:
    """Build an ARGenerator from a LARP_AR checkpoint directory (config.json + model.safetensors) or file.

    Class-conditional checkpoints must carry the null-class row (LARP has it whenever class_dropout_prob > 0, as
    in every released model).
    """
    path = os.fspath(path)
    file = path if path.endswith(".safetensors") else os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found (expected LARP's save_pretrained layout)")
    cfg_file = os.path.join(os.path.dirname(file), "config.json")
    args = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            args = json.load(f)
    sd = load_file(file)
    cfg = config_from_larp(args, sd)
    model = ARGenerator(cfg)
    model.load_state_dict(convert_state_dict(sd), strict=True)
    return model.to(device)
