"""Sparsification of task vectors (mergekit's sparsify.py): magnitude, magnitude with outliers (breadcrumbs),
Bernoulli (DARE) and MagPrune (DELLA) masks, with the optional rescale."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())


# --------------------------------------------------------------------------------------- sparsification


def _rescaled(tensor: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    """tensor * mask, scaled by |tensor|_1 / |tensor * mask|_1 when rescale (unless either norm is below eps)."""
    masked = tensor * mask
    if not rescale:
        return masked
    # float64 sums, rounded once: the streamed merges (composer.ranked) sum by blocks and must agree. mergekit sums
    # in the tensor's dtype, which can differ in the factor's last bit: far below the output dtype's rounding.
    before = tensor.abs().sum(dtype=torch.float64).to(torch.float32)
    after = masked.abs().sum(dtype=torch.float64).to(torch.float32)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def kept_range(n: int, density: float, gamma: float | None = None) -> tuple[int, int] | None:
    """The positions, in |value| order from the largest, that magnitude pruning keeps of n elements: None keeps
    everything.

    gamma None is TIES's top-k (k = max(1, int(density * n)); nothing for density <= 0); a gamma is Breadcrumbs:
    drop the int(gamma * n) largest, keep the int(density * n) next largest (the outlier cut shrinks when
    gamma + density > 1). Positions count in a stable sort: among equal |values| the earlier element comes first.
    mergekit's argsort orders equal values arbitrarily on large tensors (torch's CPU sort is not stable), so at an
    exact tie on a cut it may keep other elements than composer, which is deterministic. That needs exactly equal
    float32 task-vector entries at the cut; the cross-checks meet none on random checkpoints.
    """
    if density >= 1:
        return None
    if gamma is None:
        if density <= 0 or n == 0:
            return (0, 0)
        return (0, max(1, int(density * n)))
    target_n = int(density * n)
    n_bot = max(0, n - target_n - int(gamma * n))
    return (n - n_bot - target_n, n - n_bot)


def _keep_range(tensor: Tensor, kept: tuple[int, int] | None, rescale: bool) -> Tensor:
    if kept is None:
        return tensor
    if kept[0] >= kept[1]:
        return torch.zeros_like(tensor)
    order = torch.sort(tensor.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[order[kept[0]: kept[1]]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def _magnitude(tensor: Tensor, density: float, rescale: bool) -> Tensor:
    """Keep the k = max(1, int(density * numel)) largest |values| of the whole tensor."""
    return _keep_range(tensor, kept_range(tensor.numel(), density), rescale)


def _magnitude_outliers(tensor: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Drop the int(gamma * numel) largest |values|, then keep the int(density * numel) next largest."""
    return _keep_range(tensor, kept_range(tensor.numel(), density, gamma), rescale)


def _bernoulli(tensor: Tensor, density: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DARE: keep each element with probability density (density >= 1 keeps all and draws nothing)."""
    if density >= 1:
        return tensor
    mask = bernoulli(density, tensor.shape, generator)
    return _rescaled(tensor, mask, rescale)


def bernoulli(p: float | Tensor, shape, generator: torch.Generator | None, out: Tensor | None = None, *,
              key: int | None = None) -> Tensor:
    """A float32 mask: 1.0 with probability p (a number, or a tensor of the mask's shape), else 0.0, drawn as
    uniform < p, as torch.bernoulli does, at ~1/6 of its cost here (one uniform number per element, see uniform);
    into `out` when given. `key`: the stream's key (stream_key, key_at) instead of a draw from `generator`."""
    from composer import native

    draws, target = _draws(shape, generator, out, key)
    mask = native.bernoulli(draws, p.reshape(-1) if isinstance(p, torch.Tensor) else p)  # the same bits
    if mask is not None:
        return (mask if target is None else target.copy_(mask)).reshape(shape)
    u = _scaled(draws, draws.view(torch.float32) if target is None else target)
    return u.reshape(shape).neg_().add_(p).sign_().clamp_(min=0)


def stream_key(generator: torch.Generator) -> int:
    """The one 64-bit draw from `generator` that keys the SplitMix64 stream of a uniform or bernoulli call."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def key_at(key: int, element: int) -> int:
    """The key whose stream starts at element `element` (even) of key's: word i of it is word element // 2 + i of
    key's, as mix(key + (i + 1) * golden) shows."""
    return (key + element // 2 * _GOLDEN) % (1 << 64)


def uniform(shape, generator: torch.Generator, out: Tensor | None = None) -> Tensor:
    """float32 uniform numbers in [0, 1]: 31 random bits each, the low 31 bits of each 32-bit half (low half
    first) of a SplitMix64 stream (Steele, Lea and Flood 2014: word i is mix(key + (i + 1) * 0x9E3779B97F4A7C15),
    mod 2**64) keyed by one 64-bit draw from the generator, times 2**-31, rounded to float32 (1.0 only for the top
    64 of 2**31 values). A counter-based stream: the native kernels make it at ~1/3 of the cost of torch's
    mt19937 (20% of a DARE merge's CPU time), and the torch path makes the same words. Each call takes one draw
    from the generator, so calls in turn get independent streams. Into `out` (float32, contiguous) when given."""
    draws, target = _draws(shape, generator, out)
    return _scaled(draws, draws.view(torch.float32) if target is None else target).reshape(shape)


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(word: int) -> int:
    """A 64-bit word as the int64 that has its bits."""
    return word - (1 << 64) if word >= 1 << 63 else word


def splitmix_words(key: int, out: Tensor) -> Tensor:
    """SplitMix64 words 0, 1, ... of `key` into int64 `out` (contiguous), natively where built, else in torch's
    int64 arithmetic (which wraps mod 2**64; the logical shifts are masked arithmetic ones): the same words."""
    from composer import native

    if native.splitmix(key, out):
        return out
    torch.arange(1, out.numel() + 1, dtype=torch.int64, out=out.reshape(-1)).mul_(_signed(_GOLDEN))
    z = out.reshape(-1).add_(_signed(key))
    for shift, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        z.bitwise_xor_(z.bitwise_right_shift(shift).bitwise_and_((1 << (64 - shift)) - 1))
        if factor is not None:
            z.mul_(_signed(factor))
    return out


def _draws(shape, generator: torch.Generator | None, out: Tensor | None,
           key: int | None = None) -> tuple[Tensor, Tensor | None]:
    """uniform's int32 draws, flat, and where the float32 result goes: None for the draws' own memory (they are
    converted in place), which is out's where its elements can take 64-bit words, else out's first elements."""
    n = 1
    for size in shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,):
        n *= size
    key = stream_key(generator) if key is None else key
    if out is None or n % 2:
        draws = splitmix_words(key, torch.empty((n + 1) // 2, dtype=torch.int64)).view(torch.int32)[:n]
        return draws, None if out is None else out.reshape(-1)[:n]
    return splitmix_words(key, out.reshape(-1)[:n].view(torch.int64)).view(torch.int32), None


def _scaled(draws: Tensor, out: Tensor) -> Tensor:
    """The draws' low 31 bits times 2**-31, as float32 into `out` (which may be their own memory)."""
    return out.copy_(draws.bitwise_and_(0x7FFFFFFF)).mul_(2.0**-31)


def _della_magprune(tensor: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DELLA MagPrune: keep probability rises linearly with |value|'s rank within its row (along dim 1),
    from density - epsilon (smallest) to density + epsilon (largest); 1-D tensors are one row."""
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    mask = della_mask(rows, density, epsilon, generator)
    if mask is None:
        return tensor
    return _rescaled(rows, mask, rescale).reshape(tensor.shape)


def della_mask(rows: Tensor, density: float, epsilon: float, generator: torch.Generator | None, *,
               key: int | None = None) -> Tensor | None:
    """MagPrune's keep mask for the rows (dim 0) of a 2-D tensor, drawn from `generator` (or the stream of `key`,
    as bernoulli takes it): None keeps everything (density >= 1, nothing drawn); all zeros for density <= 0.
    Ranks are per row, so any block of whole rows can be drawn on its own (composer.merging streams DELLA this
    way)."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(rows)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    from composer import native

    probs = native.della_probs(rows, density, epsilon)  # the same bits; DELLA on 1.1B 56 s -> 27 s
    if probs is not None:
        return bernoulli(probs, probs.shape, generator, key=key)
    # each element's rank in its row: the inverse of the sorting permutation (argsort of the argsort, as mergekit
    # computes it, but scattered: one sort instead of two). The sort is one flat sort of int64 keys, the row number
    # above |x|'s float bits (which order as |x| does): 1.8x faster here than torch's per-row float sort. Equal
    # magnitudes rank in index order (a stable sort; mergekit's unstable argsort gives them an arbitrary one: a
    # random method, tested in distribution). The ranks are 1..n in every row, so mergekit's min/max normalisation
    # is (rank - 1) / (n - 1).
    n_rows, n = rows.shape
    sort_key = rows.abs().view(torch.int32).to(torch.int64)
    sort_key += (torch.arange(n_rows, dtype=torch.int64) << 31).unsqueeze(1)
    order = torch.sort(sort_key.reshape(-1), stable=True).indices
    del sort_key
    position = torch.arange(n_rows * n, dtype=torch.int64).remainder_(n).to(torch.float32)
    ranks = torch.empty(n_rows * n, dtype=torch.float32).scatter_(0, order, position.add_(1)).reshape(n_rows, n)
    del order, position
    rank_norm = ((ranks - 1.0) / float(n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return bernoulli(probs, probs.shape, generator, key=key)
