"""What LARP and DeRA share: the SVQ bottleneck, LARP's decoder, the AR prior, the public API and checkpoints.

Subclasses implement `_latents(x) -> (z [B, L, dim], aux dict)` (the encoder) and call `_init_weights()` last.
Inputs and outputs are in ``config.pixel_range`` (no rescaling inside: LARP checkpoints see [0, 1] as trained).
"""
from __future__ import annotations

import abc
import os
from typing import Any

import torch
from torch import Tensor, nn

from dera_fast._progress import progress_bar
from dera_fast._validation import check_finite, check_index_range, values_checked

from .blocks import InContextTransformer, xavier_init_linears
from .config import TokenizerConfig
from .embed import sincos_1d, sincos_3d, unpatchify
# FORMAT_VERSION, rename_key, load_state_dict_strict: re-exported for the modules that import them from here
from .pretrained import FORMAT_VERSION, load_state_dict_strict, rename_key  # noqa: F401
from .pretrained import load_pretrained, save_pretrained
from .prior import GPTCPrior, prior_loss, ss_ratio
from .quantizer import VectorQuantizer


class OutputLayer(nn.Module):
    """LARP's decoder head: LayerNorm(eps 1e-6) then a zero-initialised Linear(dim -> pt*p*p*C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


class TokenizerBase(nn.Module, abc.ABC):
    model_type = ""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if not isinstance(config, TokenizerConfig):
            raise TypeError(f"config must be a TokenizerConfig, got {type(config).__name__}")
        self.config = cfg = config
        d = cfg.dim
        self.quantizer = VectorQuantizer(d, cfg.codebook_size, cfg.code_dim, temperature=cfg.vq_temperature,
                                         beta=cfg.vq_beta, codebook_weight=cfg.vq_codebook_weight)
        # decoder inputs: fixed 1-D PE on the latents, fixed 3-D PE patch queries (+ learned type embedding)
        latent_pe = sincos_1d(d, torch.arange(cfg.num_tokens), cfg.latent_pe_base).float()[None]  # [1, L, d]
        self.register_buffer("decoder_latent_pe", latent_pe, persistent=False)
        self.register_buffer("decoder_query_pe", sincos_3d(d, *cfg.grid)[None], persistent=False)  # [1, N, d]
        self.decoder_query_type = nn.Parameter(torch.zeros(1, 1, d)) if cfg.decoder_query_type_embed else None
        self.decoder = InContextTransformer(d, cfg.decoder_depth, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps)
        self.output_layer = OutputLayer(d, cfg.patch_dim)
        self.prior = (GPTCPrior(cfg.code_dim, cfg.prior_dim, cfg.prior_depth, cfg.prior_heads, cfg.prior_max_len,
                                cfg.prior_dropout) if cfg.prior_depth else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, name: str, **overrides):
        """Build a randomly initialised model from a named preset of TokenizerConfig."""
        return cls(TokenizerConfig.from_name(name, **overrides))

    def _init_weights(self) -> None:
        """LARP's initialize_weights: xavier/zero on every Linear (prior included), N(0, std^2) queries and
        type embedding, xavier patch embeds, zero output Linear. Subclasses init their own queries/embeds first."""
        xavier_init_linears(self)
        if self.decoder_query_type is not None:
            nn.init.normal_(self.decoder_query_type, std=0.02)
        nn.init.zeros_(self.output_layer.linear.weight)
        nn.init.zeros_(self.output_layer.linear.bias)

    # ------------------------------------------------------------------ validation
    def _check_video(self, x) -> Tensor:
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float video in pixel range {cfg.pixel_range}, got dtype {x.dtype} "
                            f"(convert integer frames first, e.g. x.float() / 255 for [0, 1])")
        want = (cfg.in_channels, cfg.num_frames, cfg.size, cfg.size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be [B, C, T, H, W] = [B, {', '.join(map(str, want))}], got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one clip")
        check_finite("x", x)
        if values_checked(x):
            lo, hi = cfg.pixel_range
            margin = 0.5 * (hi - lo)
            xmin, xmax = torch.aminmax(x)
            if xmin.item() < lo - margin or xmax.item() > hi + margin:
                raise ValueError(f"x values [{xmin.item():.3g}, {xmax.item():.3g}] are far outside the model's "
                                 f"pixel range {cfg.pixel_range}")
        return x.to(device=self.decoder_query_pe.device, dtype=self.decoder_query_pe.dtype)

    def _check_ids(self, ids) -> Tensor:
        cfg = self.config
        if not isinstance(ids, Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint16, torch.uint8):
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] != cfg.num_tokens or ids.shape[0] == 0:
            raise ValueError(f"ids must be [B, {cfg.num_tokens}], got {tuple(ids.shape)}")
        ids = ids.to(device=self.decoder_query_pe.device, dtype=torch.int64)
        check_index_range("ids", ids, cfg.codebook_size)
        return ids

    # ------------------------------------------------------------------ model
    @abc.abstractmethod
    def _latents(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The encoder: validated video [B, C, T, H, W] -> (pre-quantizer latents [B, L, dim], aux outputs)."""

    def _decode_latents(self, zq: Tensor) -> Tensor:
        """zq [B, L, dim] (de-quantized latents) -> video [B, C, T, H, W]."""
        cfg = self.config
        b = zq.shape[0]
        queries = self.decoder_query_pe
        if self.decoder_query_type is not None:
            queries = queries + self.decoder_query_type
        x = self.decoder(zq + self.decoder_latent_pe, queries.expand(b, -1, -1))  # [B, N, dim]
        return unpatchify(self.output_layer(x), cfg.grid, cfg.patch_t, cfg.patch, cfg.in_channels)

    def forward(self, x: Tensor, *, step: int | None = None, max_steps: int | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Training/analysis forward.

        Args:
            x: [B, C, T, H, W] float in config.pixel_range.
            step, max_steps: training progress, for the prior's scheduled-sampling ratio (SPEC §2.5).
            generator: optional torch.Generator for the VQ and prior draws.
        Returns:
            (reconstruction [B, C, T, H, W], dict with "ids" [B, L], "codes" [B, L, code_dim], "latents"
            [B, L, dim] (pre-quantizer), losses "loss_q" (= beta*commit + codebook), "loss_commit",
            "loss_codebook", and "loss_prior" when the model has a prior and is training).
        """
        x = self._check_video(x)
        z, aux = self._latents(x)
        return self._finish(z, aux, step, max_steps, generator)

    def _finish(self, z, aux, step, max_steps, generator):
        cfg = self.config
        vq = self.quantizer(z, generator=generator)
        recon = self._decode_latents(vq.quantized)
        out = {"ids": vq.ids, "codes": vq.codes, "latents": z, "loss_q": vq.losses["vq"],
               "loss_commit": vq.losses["commitment"], "loss_codebook": vq.losses["codebook"], **aux}
        if "entropy" in vq.losses:  # the quantizer's optional entropy loss (already inside loss_q)
            out["loss_entropy"] = vq.losses["entropy"]
        if self.prior is not None and self.training:
            ratio = ss_ratio(step, max_steps, max_ratio=cfg.prior_ss_max_ratio,
                             peak_fraction=cfg.prior_ss_peak_fraction)
            out["loss_prior"] = prior_loss(self.prior, vq.codes, vq.ids, self.quantizer.embedding.weight,
                                           ratio=ratio, rounds=cfg.prior_rounds,
                                           temperature=cfg.prior_ce_temperature, generator=generator)
        return recon, out

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] float in config.pixel_range -> token ids int64 [B, L].

        Deterministic (argmax) in eval mode; in training mode the SVQ samples, as LARP's training does.
        """
        z, _ = self._latents(self._check_video(x))
        return self.quantizer(z).ids

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """ids [B, L] integer in [0, K) -> video [B, C, T, H, W] (unclamped; clamp to pixel_range to view)."""
        return self._decode_latents(self.quantizer.decode_ids(self._check_ids(ids)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x))."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def encode_video(self, video: Tensor, clip_len: int | None = None, stride: int | None = None,
                     batch_size: int = 8, progress: bool | None = None) -> Tensor:
        """Tokenize a long video clip by clip, batch_size clips at a time, moving ids to the CPU per chunk.

        Args:
            video: [C, T, H, W] float in config.pixel_range (any device; chunks move to the model's device).
            clip_len: frames per clip; must equal frames_per_clip (default).
            stride: frames between clip starts (default clip_len). Clips start at 0, stride, ...; trailing
                frames that do not fill a clip are dropped; a video shorter than one clip is padded by
                repeating its last frame (LARP's data pipeline rule).
            batch_size: clips per encoder call.
            progress: show a progress bar (None: the package setting, ``dera_fast.set_progress_bar_config``).
        Returns:
            int64 [N_clips, L] on the CPU.

        For a video file, :meth:`encode_stream` over ``dera_fast.data.iter_clips`` never holds the whole video.
        """
        clip_len = self.frames_per_clip if clip_len is None else clip_len
        if clip_len != self.frames_per_clip:
            raise ValueError(f"clip_len must be {self.frames_per_clip} for this model, got {clip_len}")
        stride = clip_len if stride is None else stride
        if stride <= 0 or batch_size <= 0:
            raise ValueError(f"stride and batch_size must be positive, got {stride} and {batch_size}")
        if not isinstance(video, Tensor) or video.dim() != 4:
            raise ValueError(f"video must be a [C, T, H, W] tensor, got "
                             f"{tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__}")
        t = video.shape[1]
        if t < clip_len:
            video = torch.cat([video, video[:, -1:].expand(-1, clip_len - t, -1, -1)], dim=1)
            t = clip_len
        starts = list(range(0, t - clip_len + 1, stride))
        clips = [video[:, s:s + clip_len] for s in starts]  # views, no copies
        return torch.cat([ids for _, ids in self.encode_stream(clips, batch_size, progress=progress)])

    def encode_stream(self, clips, batch_size: int = 8, *, progress: bool | None = None):
        """Tokenize clips as they arrive, ``batch_size`` at a time: memory stays flat however long the stream.

        Args:
            clips: an iterable of [C, T, H, W] clips in config.pixel_range with T == frames_per_clip, e.g.
                ``dera_fast.data.iter_clips(path, model.frames_per_clip, size=model.config.size,
                value_range=model.config.pixel_range)``. They are moved to the model's device and dtype per batch.
            batch_size: clips per encoder call.
            progress: a progress bar over the clips (None: the package setting, ``dera_fast.set_progress_bar_config``).
        Yields:
            ``(batch [b, C, T, H, W] as given, ids int64 [b, L] on the CPU)`` per batch of b <= batch_size clips,
            so a caller can compare or decode each batch and let it go.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        pending: list[Tensor] = []
        bar = progress_bar(total=len(clips) if hasattr(clips, "__len__") else None, progress=progress,
                           desc="encode", unit="clip")

        def flush():
            batch = torch.stack(pending)  # [b, C, T, H, W]
            pending.clear()
            ids = self.encode(batch).cpu()  # encode moves the batch to the model's device and dtype
            bar.update(batch.shape[0])
            return batch, ids

        with bar:
            for clip in clips:
                if not isinstance(clip, Tensor) or clip.dim() != 4 or clip.shape[1] != self.frames_per_clip:
                    raise ValueError(f"clips must be [C, {self.frames_per_clip}, H, W] tensors, got "
                                     f"{tuple(clip.shape) if isinstance(clip, Tensor) else type(clip).__name__}")
                pending.append(clip)
                if len(pending) == batch_size:
                    yield flush()
            if pending:
                yield flush()

    @property
    def tokens_per_clip(self) -> int:
        return self.config.num_tokens

    @property
    def frames_per_clip(self) -> int:
        return self.config.num_frames

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook(self) -> Tensor:
        """[K, code_dim] l2-normalised codebook (the vectors decode() looks up)."""
        return self.quantizer.normalized_codebook().detach()

    def num_parameters(self, *, prior: bool = False, training_heads: bool = False) -> int:
        """Parameter count of the tokenizer; the AR prior and DeRA's alignment heads only when asked."""
        skip = ([] if prior else ["prior."]) + ([] if training_heads else ["align_head_"])
        return sum(p.numel() for n, p in self.named_parameters() if not any(n.startswith(s) for s in skip))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors atomically (:mod:`dera_fast.models.pretrained` format; the
        config is repeated in the safetensors metadata)."""
        save_pretrained(directory, model_type=self.model_type, config=self.config.to_dict(),
                        state_dict=self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu"):
        """Load a save_pretrained directory, or a lone model.safetensors (config read from its metadata).

        Safetensors only, never pickle. Returns the model in eval mode (deterministic argmax VQ) on ``device``.
        """
        return load_pretrained(cls, path, config_cls=TokenizerConfig, device=device)
