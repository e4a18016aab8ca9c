"""Load an official LARP tokenizer checkpoint (hywang66/LARP) as a dera_fast `LARPTokenizer`.

Layout read: what LARP's `PyTorchModelHubMixin.save_pretrained` writes, i.e. a directory with `config.json` (the
`LARPTokenizer.__init__` arguments: bottleneck / prior_model dicts plus the scalar options) and
`model.safetensors` (its state dict). Keys are renamed (table below); LARP's fixed sin-cos buffers are checked
against ours and dropped (ours are recomputed, not stored). Pixels stay in LARP's [0, 1].
"""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file
from torch import Tensor

from dera_fast.models.config import TokenizerConfig
from dera_fast.models.larp import LARPTokenizer
from dera_fast.models.pretrained import load_state_dict_strict, rename_key

# GPTC presets of LARP's models/gptc.py: name -> (n_layer, n_head, n_embd)
GPTC_SIZES = {"gptc-L": (24, 16, 1024), "gptc-B": (12, 12, 768), "gptc-M": (12, 8, 512),
              "gptc-S": (12, 6, 384), "gptc-XS": (6, 6, 384), "gptc-XXS": (6, 4, 256)}

# LARP key regex -> dera_fast key template (first match wins; blocks keep timm's names)
KEY_MAP = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder_latent_query_embed", r"queries"),
    (r"decoder_patch_query_token_type_embed", r"decoder_query_type"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.(.+)", r"\1.blocks.\2.\3"),
    (r"bottleneck\.(in_linear|out_linear)\.(weight|bias)", r"quantizer.\1.\2"),
    (r"bottleneck\.regularizer\.embedding\.weight", r"quantizer.embedding.weight"),
    (r"final_layer\.norm_final\.(weight|bias)", r"output_layer.norm.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"output_layer.linear.\1"),
    (r"prior_model\.blocks\.(\d+)\.mlp\.0\.(weight|bias)", r"prior.blocks.\1.fc1.\2"),
    (r"prior_model\.blocks\.(\d+)\.mlp\.2\.(weight|bias)", r"prior.blocks.\1.fc2.\2"),
    (r"prior_model\.(.+)", r"prior.\1"),
]
# LARP's fixed (non-learned) buffers -> ours; verified equal, then dropped
FIXED_BUFFERS = {"encoder_patch_pe": "encoder_pe", "decoder_latent_pe": "decoder_latent_pe",
                 "decoder_patch_query_embed": "decoder_query_pe"}
# LARP constructor options we implement only at one value (LARP-L's), with that value
REQUIRED = {"transformer_name": "transformer_encoder_parallel", "learned_encoder_patch_pe": False,
            "learned_encoder_latent_query_embed": True, "learned_decoder_latent_pe": False,
            "learned_decoder_patch_query_embed": False, "use_encoder_patch_token_type_embed": False,
            "use_encoder_latent_query_token_type_embed": False, "use_decoder_latent_token_type_embed": False}
# LARP constructor defaults for keys a config.json may omit
DEFAULTS = {"bottleneck_token_num": 1024, "input_size": 128, "frame_num": 16, "temporal_patch_size": 4,
            "patch_size": 8, "decoder_temporal_patch_size": 4, "decoder_patch_size": 8, "in_channels": 3,
            "latent_pe_scale_factor": 10000, "query_init_std": 0.02, "encoder_hidden_size": 768,
            "decoder_hidden_size": 768, "encoder_num_heads": 12, "decoder_num_heads": 12, "encoder_depth": 6,
            "decoder_depth": 6, "use_decoder_patch_query_token_type_embed": False, **REQUIRED}


def config_from_larp(args: dict, *, prior: bool = True, ln_eps: float = 1e-5) -> TokenizerConfig:
    """Translate LARP's constructor arguments (its config.json) into a TokenizerConfig (pixel range [0, 1])."""
    a = {**DEFAULTS, **args}
    bad = [f"{k}={a[k]!r} (need {v!r})" for k, v in REQUIRED.items() if a[k] != v]
    for key in ("encoder_name", "decoder_name"):  # None / "none" mean "use transformer_name"
        if str(a.get(key)).lower() not in ("none", "no", "null", "") and a[key] != REQUIRED["transformer_name"]:
            bad.append(f"{key}={a[key]!r}")
    if a["temporal_patch_size"] <= 1:
        bad.append(f"temporal_patch_size={a['temporal_patch_size']} (per-frame VideoPatchEmbed)")
    for ours, theirs in (("temporal_patch_size", "decoder_temporal_patch_size"), ("patch_size", "decoder_patch_size"),
                         ("encoder_hidden_size", "decoder_hidden_size"), ("encoder_num_heads", "decoder_num_heads")):
        if a[ours] != a[theirs]:
            bad.append(f"{ours}={a[ours]} != {theirs}={a[theirs]}")
    bott = a.get("bottleneck") or {}
    bargs = bott.get("args", {})
    reg = bargs.get("regularizer") or {}
    rargs = reg.get("args", {})
    if reg.get("name") != "vq" or not rargs.get("l2_normalized") or not rargs.get("stochastic"):
        bad.append(f"regularizer {reg.get('name')!r} with {rargs} (need stochastic l2-normalised 'vq')")
    if str(bargs.get("norm", "none")).lower() not in ("none", "no"):
        bad.append(f"bottleneck norm={bargs.get('norm')!r}")
    if rargs.get("stochastic_temperature", 1.0) <= 0:
        bad.append("learnable stochastic_temperature")
    pm = a.get("prior_model") or {}
    has_prior = prior and str(pm.get("name", "none")).lower() not in ("none", "no", "null", "")
    if has_prior:
        if pm["name"] not in GPTC_SIZES:
            bad.append(f"prior_model name={pm['name']!r}")
        if pm.get("no_grad_before_last_round") or not pm.get("avg_loss_over_rounds", True) \
                or not pm.get("use_mix_ss", True):
            bad.append("prior options no_grad_before_last_round / avg_loss_over_rounds=false / use_mix_ss=false "
                       "(training-only: pass prior=False to load without the prior)")
    if bad:
        raise ValueError("unsupported LARP options: " + "; ".join(bad))
    depth, heads, pdim = GPTC_SIZES.get(pm.get("name"), (0, 1, 1)) if has_prior else (0, 1, 1)
    pargs = pm.get("args", {}) if has_prior else {}
    return TokenizerConfig(
        num_frames=a["frame_num"], size=a["input_size"], in_channels=a["in_channels"],
        patch_t=a["temporal_patch_size"], patch=a["patch_size"], pixel_range=(0.0, 1.0),
        dim=int(a["encoder_hidden_size"]), num_heads=int(a["encoder_num_heads"]), encoder_depth=a["encoder_depth"],
        decoder_depth=a["decoder_depth"], ln_eps=ln_eps, query_init_std=a["query_init_std"],
        latent_pe_base=float(a["latent_pe_scale_factor"]),
        decoder_query_type_embed=bool(a["use_decoder_patch_query_token_type_embed"]),
        num_tokens=a["bottleneck_token_num"], num_appearance_tokens=0, codebook_size=rargs["codebook_size"],
        code_dim=bargs["bottleneck_dim"], vq_temperature=float(rargs.get("stochastic_temperature", 1.0)),
        vq_beta=float(rargs.get("commitment_loss_weight", 0.25)),
        vq_codebook_weight=float(rargs.get("codebook_loss_weight", 1.0)),
        prior_depth=depth, prior_dim=pdim, prior_heads=heads, prior_max_len=int(pargs.get("max_seq_len", 1024)),
        prior_dropout=0.0 if pm.get("no_dropout") else float(pargs.get("embd_pdrop", 0.1)),
        prior_rounds=int(pm.get("n_rounds", 2)), prior_ss_max_ratio=float(pm.get("mix_ss_max_ratio", 0.5)),
        prior_ss_peak_fraction=float(pm.get("mix_ss_peak_steps_ratio", 0.3)),
        prior_ce_temperature=float(pm.get("latent_ce_temperature", 1.0)))


def map_larp_state_dict(state: dict[str, Tensor], *, prior: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rename LARP state-dict keys to dera_fast's.

    Returns (mapped learned tensors, LARP's fixed buffers under our buffer names). Keys that match no rule are
    passed through unchanged, so the strict load reports them as unexpected. With prior=False the prior's
    tensors are dropped.
    """
    mapped, fixed = {}, {}
    for key, value in state.items():
        key = re.sub(r"^(module\.|_orig_mod\.)+", "", key)  # DDP / torch.compile wrappers
        if key in FIXED_BUFFERS:
            fixed[FIXED_BUFFERS[key]] = value
            continue
        if not prior and key.startswith("prior_model."):
            continue
        mapped[rename_key(key, KEY_MAP) or key] = value
    return mapped, fixed


def from_larp(path: str | os.PathLike, *, prior: bool = False, ln_eps: float = 1e-5,
              device: str | torch.device = "cpu") -> LARPTokenizer:
    """Load an official LARP tokenizer directory (config.json + model.safetensors) as an eval LARPTokenizer.

    Args:
        path: directory written by LARP's `save_pretrained` (e.g. a local copy of hywang66/LARP-L-long-tokenizer).
        prior: also load the training-time AR prior (needed only to continue training).
        ln_eps: LayerNorm eps of the transformer blocks: 1e-5 for checkpoints trained with timm < 1.0.16 (the
            released ones, late 2024), 1e-6 for newer timm.
        device: where to put the model.
    Returns:
        LARPTokenizer in eval mode (deterministic argmax VQ), pixel range [0, 1].
    """
    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: expected LARP's save_pretrained layout "
                                    f"(config.json + model.safetensors)")
    with open(cfg_path) as f:
        config = config_from_larp(json.load(f), prior=prior, ln_eps=ln_eps)
    mapped, fixed = map_larp_state_dict(load_file(w_path), prior=prior)
    model = LARPTokenizer(config)
    buffers = dict(model.named_buffers())
    for name, value in fixed.items():
        ours = buffers[name]
        if value.shape != ours.shape or not torch.allclose(value.float(), ours, atol=1e-5):
            raise ValueError(f"{w_path}: LARP's fixed buffer for {name} differs from dera_fast's sin-cos table "
                             f"(shape {tuple(value.shape)} vs {tuple(ours.shape)}); the checkpoint layout is not "
                             f"the one this converter supports")
    load_state_dict_strict(model, mapped, source=w_path)
    return model.to(device).eval()
