"""Bookkeeping on bounds: which neurons need a CROWN bound, and merging CROWN into interval bounds."""
from __future__ import annotations

import torch


def unstable(ins, ps, attrs):
    """Flat indices of the neurons to refine: those with l < 0 < u in any region of the batch
    (l < k < u for any kink k in ps: the readers' kinks, Relaxation.kink); all of them when
    there is any and more than attrs["dense_fraction"] of the layer is."""
    lo, hi = ins[0]
    if ps:
        mask = torch.stack([(lo < k) & (hi > k) for k in ps]).any(0).flatten(1).any(0)
    else:
        mask = ((lo < 0) & (hi > 0)).flatten(1).any(0)
    idx = mask.nonzero().flatten()
    if idx.numel() and idx.numel() > attrs["dense_fraction"] * mask.numel():
        idx = torch.arange(mask.numel(), device=mask.device)
    return (idx,)


# Two bounds of one value, each sound in real arithmetic, can cross by their float32 rounding where
# the value is pinned (at a point box, a CROWN upper bound -8.6e-12 under a ReLU's exact 0), and an
# interval whose lower end is above its upper one misleads every rule after it (Sign read that
# upper end as -1, and the output's upper bound fell 0.66 under the network's value). So merges
# never leave ends crossed: an intersection whose ends cross meets at the interval bound's nearer
# end (the result stays inside the interval bound), a CROWN bound taken alone has crossed ends
# swapped. Sound plans' bounds never cross (both hold exactly): there these change nothing.

def ordered(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """stack(lo, hi) with crossed ends swapped."""
    return torch.stack((torch.minimum(lo, hi), torch.maximum(lo, hi)))


def met(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """stack(lo, hi), an intersection with the interval bound s = stack(l, u) (lo >= l, hi <= u),
    with crossed ends met at s's nearer end."""
    lo = torch.minimum(lo, s[1])
    return torch.stack((lo, torch.maximum(hi, lo)))


def merge_sparse(ins, ps, attrs):
    """The selected neurons take their CROWN bounds; with attrs["intersect"] the CROWN and
    interval bounds are intersected instead (both are sound, so is their intersection). An
    index [B, k] selects per region. With attrs["dense"], crown holds every neuron's bounds.
    Crossed ends: see `met` and `ordered`."""
    s, idx, crown = ins
    if attrs.get("dense"):
        crown = crown.index_select(-1, idx)
    flat = s.flatten(2)
    out = flat.clone()
    if idx.dim() == 2:                          # per region (a repeated neuron: the better bound)
        assert attrs["intersect"], "per-region merges intersect"
        out[0].scatter_reduce_(1, idx, crown[0], "amax")
        out[1].scatter_reduce_(1, idx, crown[1], "amin")
        return (met(flat, *out).view(s.shape),)
    if attrs["intersect"]:
        out[0][:, idx] = torch.maximum(out[0][:, idx], crown[0])
        out[1][:, idx] = torch.minimum(out[1][:, idx], crown[1])
        return (met(flat, *out).view(s.shape),)
    out[:, :, idx] = ordered(*crown)
    return (out.view(s.shape),)


def intersect(ins, ps, attrs):
    """CROWN bounds for every neuron, intersected with the interval bounds (crossed ends `met`)."""
    s, crown = ins
    crown = crown.view(s.shape)
    return (met(s, torch.maximum(s[0], crown[0]), torch.minimum(s[1], crown[1])),)


def replace(ins, ps, attrs):
    """Textbook CROWN: the back-substitution bound replaces the interval bound (crossed ends
    `ordered`: its lower and upper passes round apart)."""
    s, crown = ins
    return (ordered(*crown.view(s.shape)),)


RULES = {"unstable": unstable, "merge_sparse": merge_sparse, "intersect": intersect, "replace": replace}
