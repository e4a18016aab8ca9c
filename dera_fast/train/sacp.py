"""SACP for training: DeRA's Algorithm 1 (loss rewriting, the paper default) and explicit per-group PCGrad.

Paper form (SPEC.md §3.7): probe g_a = d L_a / d theta_E and g_m = d L_m / d theta_E on the shared encoder
parameters, s = <g_a, g_m>; if s < 0 the rewritten total is w_a L_a + w_m L_m with the detached weights
w_a = 1 - s / (|g_a|^2 + eps), w_m = 1 - s / (|g_m|^2 + eps), else (1, 1). Backpropagating it once gives theta_E
exactly the two-task PCGrad gradient g_a' + g_m' (and scales the alignment gradients of every other parameter by
w_a / w_m, which is what the paper's loss rewriting implies).

Cost: two partial backward passes (the probes, ``torch.autograd.grad``) plus one multi-tensor Gram pass; the weights
stay on the device (0-dim tensors), so nothing syncs the host.

DDP semantics:
  * ``torch.autograd.grad`` does not run the AccumulateGrad nodes that DDP's reducer hooks into, so the probes are
    local to each rank and cost no communication.
  * ``global_grads=False`` (default): each rank computes its weights from its local probe gradients ("local-batch"
    SACP); the one normal backward of the rewritten loss then all-reduces as usual.
  * ``global_grads=True``: the full probe gradients are averaged across ranks first (one all-reduce of both
    gradient lists, ~2x the gradient traffic), so every rank gets the weights of the global batch. All-reducing
    only the three Gram scalars would NOT be equivalent (it averages per-rank statistics), so that is not offered.
  * ``mode="project"`` writes the projected gradients into ``.grad`` outside DDP's reducer. With
    ``global_grads=True`` they are identical on every rank; with the default they are local, and a later DDP
    backward (of the remaining losses) averages the accumulated ``.grad`` across ranks as part of its bucket.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..ops.sacp import gradient_gram, sacp_coefficients, sacp_project

MODES = ("loss_reweight", "project")


def _probe(loss: Tensor, params: Sequence[Tensor]) -> tuple[Optional[Tensor], ...]:
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _all_reduce_mean(grads: list[list[Optional[Tensor]]], params: Sequence[Tensor], process_group) -> None:
    """Average every gradient list across ranks in place (None -> zeros, so all ranks send the same layout)."""
    import torch.distributed as dist

    for gl in grads:
        for i, g in enumerate(gl):
            if g is None:
                gl[i] = torch.zeros_like(params[i])
    flat = torch._utils._flatten_dense_tensors([g for gl in grads for g in gl])  # one all-reduce for everything
    dist.all_reduce(flat, group=process_group)
    flat /= dist.get_world_size(process_group)
    synced = torch._utils._unflatten_dense_tensors(flat, [g for gl in grads for g in gl])
    k = 0
    for gl in grads:
        for i in range(len(gl)):
            gl[i] = synced[k]
            k += 1


def sacp_weights(loss_a: Tensor, loss_m: Tensor, params: Iterable[Tensor], *, eps: float = 1e-8,
                 global_grads: bool = False, process_group=None,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """DeRA's SACP loss weights (Algorithm 1 with one global group).

    Args:
        loss_a, loss_m: 0-dim losses (appearance / motion alignment; any common scale, e.g. GradScaler-scaled).
        params: the shared encoder parameters theta_E.
        eps: stabiliser added to the squared norms.
        global_grads: average the probe gradients across DDP ranks first (see the module docstring).
        backend: backend of the Gram pass (None = auto).
    Returns:
        (w_a, w_m): detached fp32 0-dim tensors on the losses' device, >= 1; (1, 1) when s >= 0 or when a probe
        gradient is not finite. The rewritten total is ``w_a * loss_a + w_m * loss_m``.
    """
    params = list(params)
    g_a, g_m = list(_probe(loss_a, params)), list(_probe(loss_m, params))
    if global_grads:
        _all_reduce_mean([g_a, g_m], params, process_group)
    gram = gradient_gram(g_a, g_m, backend=backend).to(device=loss_a.device, dtype=torch.float32)
    w = sacp_coefficients(gram, eps)[0]  # [2]
    return w[0], w[1]


class SACP:
    """SACP helper for a training step.

    ``mode="loss_reweight"`` (paper default)::

        sacp = SACP(model.shared_encoder_parameters())
        loss = loss_rec + sacp.reweight(lam_a * loss_a, lam_m * loss_m)   # probes, then w_a*L_a + w_m*L_m
        loss.backward()                                                  # the one normal backward

    ``mode="project"`` (ablation: textbook per-group PCGrad written into ``.grad``)::

        sacp = SACP(shared, mode="project", groups="tensor", other_params=heads)
        sacp.backward(lam_a * loss_a, lam_m * loss_m, rest=loss_rec)

    Args:
        params: the shared encoder parameters theta_E (those not requiring grad are skipped).
        mode: "loss_reweight" or "project".
        groups: "global" (one group, the paper), "tensor" (one per parameter), or a list of group ids, one per
            parameter (e.g. one id per transformer block); used by mode="project" only.
        other_params: mode="project" only: parameters outside theta_E that the two losses reach (heads, patch
            embeds, queries); they get the unprojected sum of the two gradients. Required there (may be []).
        eps, global_grads, process_group, backend: see :func:`sacp_weights`.
    """

    def __init__(self, params: Iterable[Tensor], *, mode: str = "loss_reweight", groups="global",
                 other_params: Optional[Iterable[Tensor]] = None, eps: float = 1e-8, global_grads: bool = False,
                 process_group=None, backend: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params must contain at least one parameter that requires grad")
        if mode == "project" and other_params is None:
            raise ValueError("mode='project' needs other_params (the non-shared parameters the two losses reach; "
                             "[] if none), otherwise their alignment gradients would be dropped")
        self.other_params = [p for p in (other_params or []) if p.requires_grad]
        if groups == "global":
            self.groups = None
        elif groups == "tensor":
            self.groups = list(range(len(self.params)))
        elif isinstance(groups, str):
            raise ValueError(f"groups must be 'global', 'tensor' or a list of ints, got {groups!r}")
        else:
            self.groups = [int(g) for g in groups]
            if len(self.groups) != len(self.params):
                raise ValueError(f"groups needs one id per parameter ({len(self.params)}), got {len(self.groups)}")
        self.mode, self.eps, self.global_grads = mode, eps, global_grads
        self.process_group, self.backend = process_group, backend

    def weights(self, loss_a: Tensor, loss_m: Tensor) -> tuple[Tensor, Tensor]:
        """(w_a, w_m) of the paper form; see :func:`sacp_weights`."""
        return sacp_weights(loss_a, loss_m, self.params, eps=self.eps, global_grads=self.global_grads,
                            process_group=self.process_group, backend=self.backend)

    def reweight(self, loss_a: Tensor, loss_m: Tensor) -> Tensor:
        """The rewritten alignment loss w_a * loss_a + w_m * loss_m (weights detached); mode="loss_reweight"."""
        if self.mode != "loss_reweight":
            raise RuntimeError("reweight() is the loss_reweight mode; use backward() in mode='project'")
        w_a, w_m = self.weights(loss_a, loss_m)
        return w_a * loss_a + w_m * loss_m

    def backward(self, loss_a: Tensor, loss_m: Tensor, rest: Optional[Tensor] = None) -> None:
        """Accumulate the SACP gradient of loss_a + loss_m (+ the plain gradient of ``rest``) into ``.grad``.

        mode="loss_reweight": one backward of ``reweight(loss_a, loss_m) + rest``. mode="project": per-group
        projected g_a' + g_m' into the shared parameters' ``.grad``, g_a + g_m into ``other_params``' ``.grad``,
        then ``rest.backward()``.
        """
        if self.mode == "loss_reweight":
            total = self.reweight(loss_a, loss_m)
            (total if rest is None else total + rest).backward()
            return
        params = self.params + self.other_params
        n = len(self.params)
        g_a, g_m = list(_probe(loss_a, params)), list(_probe(loss_m, params))
        if self.global_grads:
            _all_reduce_mean([g_a, g_m], params, self.process_group)
        shared = sacp_project(g_a[:n], g_m[:n], groups=self.groups, eps=self.eps,
                              out=[p.grad for p in self.params], accumulate=True, backend=self.backend)
        for p, g in zip(self.params, shared):
            p.grad = g
        for p, ga, gm in zip(self.other_params, g_a[n:], g_m[n:]):
            for g in (ga, gm):
                if g is not None:
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        if rest is not None:
            rest.backward()
