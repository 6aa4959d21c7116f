"""Token routing for mixtures of low-rank experts, and a balance loss that needs no training-step change.

``top_k_gates``: ``g(x) = softmax(W_r x)`` over ``E`` experts (from the logits ``W_r x``), keeping
the ``k`` largest probabilities per token (not renormalised, so a gate still says how sure the router is).

``grouped_balance_loss``: a Switch-Transformer load-balancing loss computed *within groups of
experts* (FRAME groups experts by their fractional order). With ``f_e`` the fraction of the
token-to-expert assignments that went to expert ``e`` and ``P_e`` the mean router probability
of ``e`` over the tokens, both renormalised inside the expert's group ``G``::

    aux = mean over groups with |G| >= 2 of  |G| * sum_{e in G} (f_e / f_G) (P_e / P_G)

equal to 1 for a uniform load inside every group. Only ``P`` carries a gradient (``f`` counts
discrete choices). Balancing only inside a group leaves the router free to send more tokens to
one adaptation domain than another, while experts of the same domain (near-duplicates) are
kept from collapsing onto one. Groups with one expert are constant and left out; without any
group of two or more experts the loss is 0.

``with_aux_gradient(y, aux, coef)``: returns ``y`` unchanged; its backward also sends the
gradient ``coef`` into the scalar ``aux``, so *any* ``loss.backward()`` that reaches ``y``
adds ``coef * d aux / d params`` to the router's gradient, without the user's training step
ever seeing ``aux``.
"""

from __future__ import annotations

import torch

__all__ = ["grouped_balance_loss", "top_k_gates", "with_aux_gradient"]


def top_k_gates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [T, E], gates [T, E])`` from router logits ``[T, E]``: the softmax (in float32
    at least) and the same with all but each token's ``top_k`` entries zeroed."""
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    if top_k >= probs.shape[-1]:
        return probs, probs
    values, index = probs.topk(top_k, dim=-1)
    return probs, torch.zeros_like(probs).scatter(-1, index, values)


def grouped_balance_loss(
    probs: torch.Tensor, gates: torch.Tensor, membership: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aux, load)``: the grouped balance loss (a scalar, differentiable in ``probs``)
    and the detached per-expert load ``f [E]`` (fractions summing to 1).

    ``probs``/``gates`` ``[T, E]`` from :func:`top_k_gates`; ``membership [G, E]``: one-hot
    group of each expert. No host synchronisation."""
    membership = membership.to(probs.dtype)
    chosen = (gates > 0).to(probs.dtype) if top_k < probs.shape[-1] else torch.ones_like(probs)
    load = chosen.mean(dim=0) / min(top_k, probs.shape[-1])  # f_e
    mean_prob = probs.mean(dim=0)  # P_e
    eps = torch.finfo(probs.dtype).tiny
    load_in_group = membership.T @ (membership @ load)  # f_G of each expert's group
    prob_in_group = membership.T @ (membership @ mean_prob)
    size = membership.sum(dim=1)  # |G|
    per_group = size * (membership @ ((load / load_in_group.clamp_min(eps)) * (mean_prob / prob_in_group.clamp_min(eps))))
    counted = (size >= 2).float()
    aux = (per_group * counted).sum() / counted.sum().clamp_min(1.0)
    return aux, load.detach()


class _WithAuxGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, coef: float) -> torch.Tensor:  # type: ignore[override]
        ctx.coef, ctx.aux_dtype, ctx.aux_device = coef, aux.dtype, aux.device
        ctx.mark_dirty(y)  # y itself is returned (no copy, no view): later in-place ops on it stay legal
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        return grad_y, torch.full((), ctx.coef, dtype=ctx.aux_dtype, device=ctx.aux_device), None


def with_aux_gradient(y: torch.Tensor, aux: torch.Tensor, coef: float) -> torch.Tensor:
    """``y`` (the same tensor, changed in place in autograd's view only) whose backward also
    back-propagates ``coef`` into the scalar ``aux``. ``y`` must be an intermediate result
    (not a leaf, not a view) that nothing else has used yet."""
    return _WithAuxGradient.apply(y, aux, coef)
