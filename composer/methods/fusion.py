"""The fusion methods: SCE (select, calculate, erase), Arcee Fusion (KL-weighted importance gate) and the RAM
pair (Reinforced Agent Merging: unique deltas kept, shared ones averaged), as in mergekit 0.1.5."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    from composer.methods.common import LazyTorch

    torch = LazyTorch(globals())

from composer.methods.common import float32 as _float32
from composer.methods.taskvectors import _sign_consensus

# Checked against mergekit 0.1.5 (merge_methods/sce.py, arcee_fusion.py, ram.py): the same torch operations in the
# same order, on float32 inputs. mergekit computes in the inputs' own (promoted) dtype, so with `dtype: float32` the
# two agree bit for bit; on bfloat16/float16 inputs mergekit rounds every intermediate (deltas, variances, weights,
# softmaxes, sums) to that dtype, while composer computes in float32 and rounds once.
#
# How each could stream over blocks of a tensor (composer.methods.method.Streaming):
# - ram: elementwise. The per-element contributor count runs over models, never over the tensor, so any block can
#   be merged on its own (formula_blend).
# - ramplus_tl: one statistics pass, then elementwise. Per model, count the elements where it is nonzero and shared
#   (contributor count > 1) and where it is nonzero and unique (count == 1): integers, so block partial sums are
#   exact and any block order gives the same lambda_i; then each block is elementwise with those lambdas.
# - sce: one statistics pass for the per-model mean squares (sce_weight), then elementwise. mergekit's mean is a
#   float32 torch reduction over the whole tensor: a blocked sum (even in float64) may differ from it in the weights'
#   last bit. With select_topk < 1 a ranking first: the top k = int(count_nonzero(var) * select_topk) of the
#   per-element variance across models over the whole tensor. That is a magnitude cut like TIES's and could be found
#   the way composer/ranked.py does (histograms of the float32 bit patterns of var, per block, then the tie run at
#   the cut in index order), var being recomputed per block from the inputs; the mean squares are then those of the
#   masked task vectors, so the statistics pass comes after the ranking.
# - arcee_fusion: rows, plus a global threshold. The KL term is one number per row (softmax over the last dim), so
#   blocks must hold whole rows; the threshold needs three quantiles of the importance over the whole tensor: for
#   numel <= 1M a pass collecting all importances (at most 4 MB) and sorting them; above, the 1M sampled positions
#   (drawn up front, as one torch.randint call) gathered in a pass over the rows. A second pass applies the mask
#   elementwise; the per-row KL values (one float per row) can be kept from the first pass.


# ------------------------------------------------------------------------------------------------------- SCE


def sce(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """SCE: select the elements where the models vary most, weight each model by its task vector's mean square,
    erase minority signs, then a disjoint weighted mean.

    Paper: https://arxiv.org/abs/2408.07990 (the reference mergekit names for SCE).
    Formula, with d_i = x_i - base over the n non-base models:
      select (only when select_topk < 1): var = Var_i(d_i) per element (population variance, unbiased=False);
        k = int(count_nonzero(var) * select_topk) (the product taken in float32, as mergekit does); keep the k
        elements of largest var, zero d_i elsewhere for every model (select_topk <= 0: all zeroed);
      calculate: w_i = mean(d_i ** 2) / sum_j mean(d_j ** 2), or w_i = 1/n when that sum is below 1e-6 (as in
        mergekit: small task vectors, RMS below ~1e-3 / sqrt(n), get equal weights);
      erase: m_i = [sign(d_i) == sign(sum_j d_j)] (+1 at a zero sum; zeros never match);
      merged = base + sum_i(w_i m_i d_i) / max(sum_i(w_i m_i), 1e-6).
    Parameters (mergekit's, both shared): select_topk (1.0; meaningful in (0, 1]; >= 1 selects everything),
    int8_mask (False; only the masks' storage dtype in mergekit, never the result). There is no `weight`.
    No non-base tensors: returns base.
    Differs from mergekit only at exact ties of var at the top-k cut: composer keeps the earlier elements (flat
    index order); mergekit's torch.topk picks among equal values in an unspecified order (whatever its kernel
    yields). Such ties are rare for float32-trained deltas but the rule, not the exception, for checkpoints stored
    in bfloat16, whose deltas take few distinct values: there the two keep different elements of the tied run.
    """
    xs = _float32([base, *tensors])
    b, xs = xs[0], xs[1:]
    if not xs:
        return b
    deltas = torch.stack([x - b for x in xs], dim=0)
    if select_topk < 1:
        deltas = deltas * _sce_mask(deltas, select_topk).unsqueeze(0)
    keep = _sign_consensus(deltas, torch.int8 if int8_mask else torch.float32)
    w = _sce_weights(deltas)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    erased = w * keep
    merged = (deltas * erased).sum(dim=0)
    return b + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _sce_weights(deltas: Tensor) -> Tensor:
    """Per-model mean squares, normalized to sum 1 (mergekit's sce_weight); equal weights below a 1e-6 sum."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def _sce_mask(deltas: Tensor, density: float) -> Tensor:
    """1 at the k = int(count_nonzero(var) * density) elements of largest variance across models, else 0 (mergekit's
    sce_mask). Among equal variances at the cut the earlier elements (flat index) are kept."""
    if density <= 0:
        return torch.zeros_like(deltas[0])
    if density >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var)
    flat = var.abs().reshape(-1)
    cut = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    keep = flat > cut
    ties = torch.nonzero(flat == cut).flatten()[: k - int(keep.sum())]
    keep[ties] = True
    return keep.to(var.dtype).reshape(var.shape)


# ----------------------------------------------------------------------------------------------- Arcee Fusion

QUANTILE_SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


def arcee_fusion(base: Tensor, tensors: Sequence[Tensor], *, generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: take the model's value where its change is important, keep the base's elsewhere.

    Reference: Arcee AI, https://arcee.ai (mergekit names no paper).
    Formula, with x the one non-base model (softmax and the KL sum over the last dim, i.e. per row; a 1-D tensor
    is one row):
      p = softmax(x) + 1e-8, q = softmax(base) + 1e-8, KL = sum(p * log(p / q)) per row;
      importance = |x - base| * KL (of the element's row);
      threshold = median + 1.5 * (q3 - q1), the quantiles taken index-wise on the sorted importances:
        sorted[long(q * (n - 1))] for q = 0.25, 0.5, 0.75 (q * (n - 1) in float32, truncated);
      merged = base + (x - base) * [importance >= threshold].
    When the tensor has more than 1,000,000 elements the quantiles are those of 1,000,000 importances sampled with
    replacement: torch.randint(numel, (1_000_000,)) drawn from `generator`, or from torch's global generator when
    None (that is mergekit's behaviour: it always uses the global one, so with the same seed in each they draw the
    same positions). At or below 1,000,000 elements it is deterministic and draws nothing.
    No parameters. Inputs: the base and exactly one other model (ValueError otherwise); mergekit's optional-tensor
    policy passes a lone input through for optional tensors, which is the engine's business, not this function's.
    Same as mergekit in float32, sampling included.
    """
    if len(tensors) != 1:
        raise ValueError(f"arcee_fusion merges exactly one model into the base: got {len(tensors)} besides the base")
    b, x = _float32([base, *tensors])
    importance = _fusion_importance(x, b)
    threshold = _fusion_threshold(importance, generator)
    mask = (importance >= threshold).float()
    return b + (x - b) * mask


def _fusion_importance(x: Tensor, b: Tensor) -> Tensor:
    diff = (x - b).abs()
    eps = 1e-8
    p = torch.nn.functional.softmax(x, dim=-1) + eps
    q = torch.nn.functional.softmax(b, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def _fusion_threshold(importance: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at.to(ordered.device)]
    return median + 1.5 * (q3 - q1)


# ------------------------------------------------------------------------------------------------------- RAM


def ram(base: Tensor, tensors: Sequence[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """RAM: a task-vector element changed by one model only is kept whole; one changed by several is averaged
    over those that changed it.

    Paper: https://arxiv.org/abs/2601.13572 (the reference mergekit names; its title there: Reinforced Agent Merging).
    Formula, with d_i = x_i - base: nz_i = |d_i| > epsilon (strictly), c = sum_i nz_i per element;
      merged = base + sum_i(nz_i d_i [c == 1] + nz_i d_i [c > 1] / max(c, 1)).
    Elements no model changes by more than epsilon keep the base's value (deltas at or below epsilon are dropped,
    even where only one model has them).
    Parameters (mergekit's, shared): epsilon (1e-5; >= 0, the |delta| a model must exceed to count as changing an
    element). No non-base tensors: returns base. Same as mergekit in float32.
    """
    b, deltas, nonzero, counts, overlap, unique = _ram_parts(base, tensors, epsilon)
    if deltas is None:
        return b
    kept = deltas * nonzero
    merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


def ramplus_tl(
    base: Tensor, tensors: Sequence[Tensor], *, epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2
) -> Tensor:
    """RAM+ (tensor-local): RAM with each model's unique deltas amplified by how much of its change is shared.

    Paper: https://arxiv.org/abs/2601.13572 (as ram); "tensor-local": the statistics are taken per tensor.
    Formula, as ram, with per model i over the whole tensor: S_i = #elements with nz_i and c > 1, U_i = #elements
    with nz_i and c == 1, rho_i = S_i / max(U_i, epsilon) (float32), lambda_i = 1 + r * clamp(rho_i, 0, alpha);
      merged = base + sum_i(nz_i d_i [c == 1] lambda_i + nz_i d_i [c > 1] / max(c, 1)).
    (U_i is floored at epsilon, so a model with no unique elements gets lambda_i = 1 + r * alpha when S_i > 0; it
    has nothing for lambda_i to scale.) lambda_i lies in [1, 1 + r * alpha] for r, alpha >= 0.
    Parameters (mergekit's, all shared): epsilon (1e-5; >= 0; the delta threshold and the floor of U_i), r (0.1;
    the amplification rate), alpha (0.2; the cap on rho; with alpha < 0 the clamp's max wins and lambda_i =
    1 + r * alpha). No non-base tensors: returns base. Same as mergekit in float32.
    """
    b, deltas, nonzero, counts, overlap, unique = _ram_parts(base, tensors, epsilon)
    if deltas is None:
        return b
    shared_counts = (nonzero & overlap).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    lambda_ = 1 + r * rho.clamp(min=0, max=alpha)
    kept = deltas * nonzero
    merged = ((kept * unique * lambda_.unsqueeze(-1)) + (kept * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return b + merged.reshape_as(b)


def _ram_parts(base: Tensor, tensors: Sequence[Tensor], epsilon: float):
    """The flattened task vectors (models x elements), which exceed epsilon, how many models do per element, and
    where that is more than one / exactly one (mergekit's _prepare_ram_vectors). deltas None: no other models."""
    xs = _float32([base, *tensors])
    b, xs = xs[0], xs[1:]
    if not xs:
        return b, None, None, None, None, None
    deltas = torch.stack([x - b for x in xs], dim=0).view(len(xs), -1)
    nonzero = deltas.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return b, deltas, nonzero, counts, counts > 1, counts == 1
