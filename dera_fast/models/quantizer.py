"""LARP's stochastic vector quantiser (SVQ), built on dera_fast.ops.vq (SPEC.md §2.4), plus optional codebook health.

    z     = normalize(in_linear(h))                       # [B, L, code_dim]
    k*    ~ softmax_k(cos(z, c_k) / tau)   (training)     # argmax in eval (deterministic by default)
    q     = normalize(e_{k*})
    loss  = beta * |sg(q) - z|^2 + w_cb * |q - sg(z)|^2   # commitment + codebook, means over elements
            (+ w_ent * entropy loss, when asked)
    codes = z + sg(q - z)                                 # straight-through estimator
    out   = out_linear(codes)                             # [B, L, dim]

Codebook health (training mode only, every option off by default, so converted LARP checkpoints behave as LARP):

* ``kmeans_init``: the first training batch's latents (gathered over ranks) seed a spherical k-means whose centroids
  replace the random codebook, identically on every rank;
* ``restart_after = N``: a code no latent picked for N consecutive steps is moved onto a latent of the current
  batch (rank 0's choice, broadcast);
* ``entropy_weight``: LARP's entropy loss (its bottleneck's ``entropy_loss``, weight 0 there): the mean per-token
  entropy of softmax(-|z - c|^2 / T) minus the entropy of its batch mean, which rewards confident and spread-out
  code assignments.

Usage is tracked in every training step (EMA of per-code counts, steps since last use); :meth:`usage_stats` reports
it. This state lives in non-persistent buffers, so the inference weights (``state_dict``) keep LARP's keys;
trainers save and restore it with :meth:`health_state_dict` / :meth:`load_health_state_dict`.

Submodule names (``in_linear``, ``out_linear``, ``embedding``) follow LARP's bottleneck so its checkpoints map 1:1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class VQOutput(NamedTuple):
    ids: Tensor  # [B, L] int64 code ids
    quantized: Tensor  # [B, L, dim]: out_linear(codes), the decoder's input
    codes: Tensor  # [B, L, code_dim]: straight-through l2-normalised codes (LARP's regularized_z)
    losses: dict  # "commitment", "codebook", "entropy", "vq" (the weighted sum), fp32 0-dim


def entropy_loss(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LARP's codebook entropy loss on logits [N, K]: (sample entropy - batch-mean entropy, sample entropy,
    batch-mean entropy), fp32 scalars. Low when each row is confident and the rows spread over the codebook."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    sample = -(p * logp).sum(-1).mean()
    mean = p.mean(0)
    avg = -(mean * torch.log(mean + 1e-5)).sum()
    return sample - avg, sample, avg


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, *, iters: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """k unit centroids [k, D] of unit rows x [N, D] (cosine k-means: k-means++ seeding, then Lloyd iterations).

    With N <= k every row becomes a centroid and the rest are jittered copies of random rows. An emptied cluster is
    re-seeded from a random row. Deterministic for a given ``generator`` state (random numbers drawn on the CPU).
    """
    n, d = x.shape
    x = x.float()

    def draw(shape, kind="int"):
        t = (torch.randint(n, shape, generator=generator) if kind == "int"
             else torch.rand(shape, generator=generator) if kind == "uniform"
             else torch.randn(shape, generator=generator))
        return t.to(x.device)

    if n <= k:
        jitter = 0.05 * draw((k - n, d), "normal")
        return torch.cat([x, F.normalize(x[draw((k - n,))] + jitter, dim=-1)])
    # k-means++: each next seed drawn with probability proportional to its squared distance to the nearest seed
    c = torch.empty(k, d, device=x.device)
    c[0] = x[draw(())]
    dist2 = (2 - 2 * (x @ c[0])).clamp_min(0)  # |x - c|^2 for unit vectors
    for i in range(1, k):
        cdf = dist2.cumsum(0)
        pick = torch.searchsorted(cdf, draw((1,), "uniform") * cdf[-1]).clamp_max(n - 1)
        c[i] = x[pick[0]]
        dist2 = torch.minimum(dist2, (2 - 2 * (x @ c[i])).clamp_min(0))
    for _ in range(iters):
        assign = ops.vq_nearest(x, c, metric="cosine")  # [N]
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # [k, D]
        empty = torch.bincount(assign, minlength=k) == 0
        c = torch.where(empty[:, None], x[draw((k,))], F.normalize(sums, dim=-1))
    return F.normalize(c, dim=-1)


class VectorQuantizer(nn.Module):
    """Stochastic VQ bottleneck: linear in, l2-normalised cosine codebook, linear out.

    Args:
        dim: width of the tokens going in and out.
        codebook_size: K.
        code_dim: width of the codes (LARP: 16).
        temperature: tau of the sampling softmax over cosines (LARP: 0.03).
        beta: commitment-loss weight (0.25).
        codebook_weight: codebook-loss weight (1.0).
        stochastic: sample in training (SVQ); if False, training also takes the nearest code.
        kmeans_init, restart_after, entropy_weight, entropy_temperature: codebook health (module docstring);
            see :meth:`set_codebook_health`.
    Attribute ``deterministic_eval`` (default True): in eval mode take the argmax instead of sampling.
    Attribute ``distributed`` (default False): all-reduce usage counts and share k-means / restarts over the
    default process group (set by the trainer under torchrun; every rank must then run each training forward).
    """

    def __init__(self, dim: int, codebook_size: int, code_dim: int, *, temperature: float = 0.03,
                 beta: float = 0.25, codebook_weight: float = 1.0, stochastic: bool = True,
                 kmeans_init: bool = False, restart_after: int = 0, entropy_weight: float = 0.0,
                 entropy_temperature: float = 0.01, usage_decay: float = 0.99):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.temperature, self.beta, self.codebook_weight = temperature, beta, codebook_weight
        self.stochastic = stochastic
        self.deterministic_eval = True
        self.distributed = False
        self.in_linear = nn.Linear(dim, code_dim)
        self.out_linear = nn.Linear(code_dim, dim)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.kaiming_uniform_(self.embedding.weight)
        # training-time state, not part of the inference weights (see health_state_dict)
        self.register_buffer("usage_ema", torch.zeros(codebook_size), persistent=False)  # EMA of code counts
        self.register_buffer("idle_steps", torch.zeros(codebook_size, dtype=torch.int64), persistent=False)
        self.register_buffer("last_counts", torch.zeros(codebook_size), persistent=False)  # last step, all ranks
        self.register_buffer("kmeans_pending", torch.tensor(False), persistent=False)
        self.set_codebook_health(kmeans_init=kmeans_init, restart_after=restart_after,
                                 entropy_weight=entropy_weight, entropy_temperature=entropy_temperature,
                                 usage_decay=usage_decay)

    def set_codebook_health(self, *, kmeans_init: bool = False, restart_after: int = 0,
                            entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                            usage_decay: float = 0.99) -> None:
        """Switch the codebook-health options (module docstring). ``kmeans_init=True`` arms one k-means
        initialisation at the next training forward; ``restart_after=0`` and ``entropy_weight=0`` switch those off.
        """
        if restart_after < 0 or entropy_weight < 0 or entropy_temperature <= 0 or not 0 <= usage_decay < 1:
            raise ValueError(f"need restart_after >= 0, entropy_weight >= 0, entropy_temperature > 0 and "
                             f"usage_decay in [0, 1); got {restart_after}, {entropy_weight}, {entropy_temperature}, "
                             f"{usage_decay}")
        self.restart_after, self.entropy_weight = int(restart_after), float(entropy_weight)
        self.entropy_temperature, self.usage_decay = float(entropy_temperature), float(usage_decay)
        self.kmeans_pending.fill_(bool(kmeans_init))

    def normalized_codebook(self) -> Tensor:
        """[K, code_dim] fp32 unit rows."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def codes_from_ids(self, ids: Tensor) -> Tensor:
        """ids [...] -> unit code vectors [..., code_dim] fp32."""
        self._check_ids(ids)
        return F.normalize(self.embedding(ids).float(), dim=-1)

    def decode_ids(self, ids: Tensor) -> Tensor:
        """ids [B, L] -> decoder input [B, L, dim] (LARP's decode_from_bottleneck before the decoder)."""
        return self.out_linear(self.codes_from_ids(ids).to(self.out_linear.weight.dtype))

    def forward(self, h: Tensor, *, generator: torch.Generator | None = None) -> VQOutput:
        """h [B, L, dim] -> VQOutput. Sampling in training (if stochastic), argmax in deterministic eval."""
        if h.dim() != 3:
            raise ValueError(f"h must be [B, L, dim], got shape {tuple(h.shape)}")
        B, L, _ = h.shape
        z_raw = self.in_linear(h)
        with torch.autocast(device_type=h.device.type, enabled=False):  # quantiser math in fp32, as LARP
            z = F.normalize(z_raw.float(), dim=-1)
            flat = z.detach().reshape(B * L, self.code_dim)  # [B*L, code_dim]
            if self.training:
                self._maintain_codebook(flat)  # before the codebook enters this step's graph
            emb = self.normalized_codebook()
            sample = self.stochastic and (self.training or not self.deterministic_eval)
            if sample:
                ids = ops.vq_sample(flat, emb, temperature=self.temperature, generator=generator)
            else:
                ids = ops.vq_nearest(flat, emb, metric="cosine")
            ids = ids.view(B, L)
            if self.training:
                self._count(ids)
            q = F.embedding(ids, emb)  # [B, L, code_dim], differentiable w.r.t. the codebook
            commitment = F.mse_loss(z, q.detach())
            codebook = F.mse_loss(q, z.detach())
            vq = self.beta * commitment + self.codebook_weight * codebook
            losses = {"commitment": commitment, "codebook": codebook}
            if self.entropy_weight > 0 and self.training:
                # LARP's affinity is -|z - c|^2 = 2 cos - 2 for unit vectors; the constant drops out of the softmax
                logits = z.reshape(B * L, self.code_dim) @ emb.t() * (2.0 / self.entropy_temperature)  # [B*L, K]
                losses["entropy"] = entropy_loss(logits)[0]
                vq = vq + self.entropy_weight * losses["entropy"]
            codes = z + (q - z).detach()
        losses["vq"] = vq
        quantized = self.out_linear(codes.to(self.out_linear.weight.dtype))
        return VQOutput(ids, quantized, codes, losses)

    # ------------------------------------------------------------------ codebook health
    @torch.no_grad()
    def _maintain_codebook(self, flat: Tensor) -> None:
        """k-means initialisation (once) and dead-code restarts from this batch's unit latents flat [N, D]."""
        if bool(self.kmeans_pending):
            pool = self._gather(flat)
            centroids = (spherical_kmeans(pool, self.codebook_size) if self._rank() == 0
                         else torch.empty(self.codebook_size, self.code_dim, device=flat.device))
            self._set_codes(torch.arange(self.codebook_size, device=flat.device), self._broadcast(centroids))
            self.kmeans_pending.fill_(False)
            self.idle_steps.zero_()
            return
        if self.restart_after <= 0:
            return
        dead = (self.idle_steps >= self.restart_after).nonzero().flatten()  # identical on every rank
        if dead.numel() == 0:
            return
        pick = torch.randint(flat.shape[0], (dead.numel(),), device="cpu").to(flat.device)
        fresh = flat[pick]
        if dead.numel() > flat.shape[0]:  # more dead codes than latents: jitter the repeats apart
            fresh = F.normalize(fresh + 0.05 * torch.randn(fresh.shape, device="cpu").to(flat.device), dim=-1)
        self._set_codes(dead, self._broadcast(fresh))
        self.idle_steps[dead] = 0

    def _set_codes(self, rows: Tensor, unit: Tensor) -> None:
        """Overwrite codebook rows with unit vectors scaled to the codebook's mean row norm (so Adam's step keeps
        its angular size)."""
        w = self.embedding.weight
        scale = w.detach().float().norm(dim=-1).mean()
        w[rows] = (unit * scale).to(w.dtype)

    @torch.no_grad()
    def _count(self, ids: Tensor) -> None:
        counts = torch.bincount(ids.flatten(), minlength=self.codebook_size).float()
        if self.distributed:
            dist.all_reduce(counts)
        self.last_counts.copy_(counts)
        self.usage_ema.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)

    def usage_tensors(self) -> dict[str, Tensor]:
        """Codebook usage as 0-dim fp32 tensors on the codebook's device (no host sync, so a trainer can log it every
        step): ``vq_used`` (fraction of codes picked in the last training step, all ranks), ``vq_perplexity`` (exp of
        the entropy of those counts; 0 before any step), and over the recent past ``vq_alive`` (fraction of codes
        picked within the last restart window, or 100 steps when restarts are off) and ``vq_perplexity_ema`` (of the
        EMA counts)."""
        def perplexity(c: Tensor) -> Tensor:
            total = c.double().sum()
            p = c.double() / total.clamp_min(1e-12)
            return torch.where(total > 0, (-torch.xlogy(p, p).sum()).exp(), 0.0).float()

        window = self.restart_after or 100
        return {"vq_used": (self.last_counts > 0).float().mean(), "vq_perplexity": perplexity(self.last_counts),
                "vq_alive": (self.idle_steps < window).float().mean(), "vq_perplexity_ema": perplexity(self.usage_ema)}

    def usage_stats(self) -> dict[str, float]:
        """:meth:`usage_tensors` as Python floats."""
        return {k: float(v) for k, v in self.usage_tensors().items()}

    def health_state_dict(self) -> dict[str, Tensor]:
        """The training-time codebook state (usage EMA, idle steps, last counts, pending k-means), for checkpoints."""
        return {k: v.detach().clone() for k, v in self.named_buffers() if k in _HEALTH_BUFFERS}

    def load_health_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(_HEALTH_BUFFERS) - set(state))
        if missing:
            raise KeyError(f"quantizer health state lacks {missing}")
        for k in _HEALTH_BUFFERS:
            getattr(self, k).copy_(state[k])

    # ------------------------------------------------------------------ process-group helpers
    def _rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    def _gather(self, x: Tensor) -> Tensor:
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def _broadcast(self, x: Tensor) -> Tensor:
        if self.distributed:
            x = x.contiguous()
            dist.broadcast(x, src=0)
        return x

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if not torch.compiler.is_compiling() and ids.numel() and (
                bool((ids < 0).any()) or bool((ids >= self.codebook_size).any())):
            raise ValueError(f"ids must be in [0, {self.codebook_size}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, temperature={self.temperature}, "
                f"beta={self.beta}, stochastic={self.stochastic}")


_HEALTH_BUFFERS = ("usage_ema", "idle_steps", "last_counts", "kmeans_pending")
