"""composer.methods.fusion (sce, arcee_fusion, ram, ramplus_tl): each against its formula written out plainly, in
float64 with explicit loops, plus mergekit 0.1.5's edge cases."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from composer import native
from composer.methods import fusion

# The implementations compute in float32, the references below in float64: values of order 1 agree to a few float32
# ulps, which TIGHT allows and nothing more. Where both sides are exact binary fractions the tests use torch.equal.
TIGHT = dict(rtol=1e-6, atol=1e-6)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sparse_models(shape, n, *, seed, scale=0.1, keep=0.6):
    """A base and n models, each changing a random `keep` fraction of the elements (so some elements are changed
    by one model only, some by several, some by none)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < keep)
                  for _ in range(n)]


def values(t):
    return [float(v) for v in t.reshape(-1).tolist()]


def deltas64(base, xs):
    b = values(base)
    return b, [[xv - bv for xv, bv in zip(values(x), b)] for x in xs]


def sign(v):
    return (v > 0) - (v < 0)


# ---------------------------------------------------------------------------------------------------------- SCE


def sce_reference(base, xs, select_topk=1.0):
    b, d = deltas64(base, xs)
    n, size = len(d), len(b)
    if n == 0:
        return base.clone()
    if select_topk < 1:
        var = []
        for e in range(size):
            mean = sum(d[i][e] for i in range(n)) / n
            var.append(sum((d[i][e] - mean) ** 2 for i in range(n)) / n)
        k = int(sum(v != 0 for v in var) * select_topk) if select_topk > 0 else 0
        kept = set(sorted(range(size), key=lambda e: (-var[e], e))[:k])  # largest first, earlier index at ties
        d = [[v if e in kept else 0.0 for e, v in enumerate(row)] for row in d]
    mean_squares = [sum(v * v for v in row) / size for row in d]
    total = sum(mean_squares)
    w = [1 / n] * n if abs(total) < 1e-6 else [m / total for m in mean_squares]
    out = []
    for e in range(size):
        majority = 1 if sum(d[i][e] for i in range(n)) >= 0 else -1
        m = [sign(d[i][e]) == majority for i in range(n)]
        num = sum(w[i] * d[i][e] for i in range(n) if m[i])
        den = sum(w[i] for i in range(n) if m[i])
        out.append(b[e] + num / max(den, 1e-6))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("select_topk", [1.0, 0.9, 0.5, 0.3, 0.1])
def test_sce_is_its_formula(n, select_topk):
    base, xs = sparse_models((9, 7), n, seed=10 * n + int(10 * select_topk))
    assert_close(fusion.sce(base, xs, select_topk=select_topk), sce_reference(base, xs, select_topk).float(),
                 **TIGHT)


def test_sce_three_dimensional_and_dense():
    base, xs = sparse_models((3, 4, 5), 3, seed=5, keep=1.0)
    for topk in (1.0, 0.4):
        assert_close(fusion.sce(base, xs, select_topk=topk), sce_reference(base, xs, topk).float(), **TIGHT)


def test_sce_select_topk_at_or_above_one_selects_everything():
    base, xs = sparse_models((8, 6), 3, seed=6)
    assert torch.equal(fusion.sce(base, xs, select_topk=1.5), fusion.sce(base, xs))
    assert torch.equal(fusion.sce(base, xs, select_topk=1.0), fusion.sce(base, xs))


@pytest.mark.parametrize("select_topk", [0.0, -0.5, 0.01])
def test_sce_nothing_selected_returns_base(select_topk):
    # 0.01 of the 48 elements' nonzero variances: k = int(48 * 0.01) = 0, which selects nothing too.
    base, xs = sparse_models((8, 6), 3, seed=7, keep=1.0)
    assert torch.equal(fusion.sce(base, xs, select_topk=select_topk), base)


def test_sce_no_other_models_returns_base():
    base = rand(5, 4, seed=1)
    assert torch.equal(fusion.sce(base, []), base)
    assert fusion.sce(base.bfloat16(), []).dtype == torch.float32


def test_sce_zero_task_vectors_return_base():
    base = rand(5, 4, seed=2)
    assert torch.equal(fusion.sce(base, [base.clone(), base.clone()]), base)
    assert torch.equal(fusion.sce(base, [base.clone(), base.clone()], select_topk=0.5), base)


def test_sce_weights_are_mean_squares_or_equal_below_1e_6():
    """sce_weight: w_i = mean(d_i^2) / sum_j mean(d_j^2), but 1/n each when that sum is below 1e-6. Where both
    models agree in sign the result is the w-weighted mean of their deltas."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    unit = [torch.randn(6, 5, generator=g) for _ in range(2)]
    agree = unit[0].sign() == unit[1].sign()
    for scale, expect_equal_weights in ((1e-4, True), (0.1, False)):
        d = [scale * unit[0], 3 * scale * unit[1]]
        xs = [base + di for di in d]
        dd = [x - base for x in xs]  # the deltas as float32 sees them
        ms = [float(di.double().square().mean()) for di in dd]
        assert (sum(ms) < 1e-6) == expect_equal_weights
        w = [0.5, 0.5] if expect_equal_weights else [m / sum(ms) for m in ms]
        expected = base.double() + (w[0] * dd[0].double() + w[1] * dd[1].double()) / (w[0] + w[1])
        out = fusion.sce(base, xs)
        assert_close(out[agree], expected[agree].float(), **TIGHT)
        assert_close(out, sce_reference(base, xs).float(), **TIGHT)


def test_sce_topk_ties_keep_the_earlier_elements():
    # Two models, one of them the base: var = d^2 / 4. Six nonzero variances, select_topk 0.5: k = 3 of the four
    # equal largest (at 0, 2, 4, 6) -> 0, 2 and 4 are kept, 6 is not.
    base = torch.zeros(7)
    x = torch.tensor([2.0, 1.0, 2.0, 0.0, 2.0, 1.0, 2.0])
    assert torch.equal(fusion.sce(base, [x, base.clone()], select_topk=0.5),
                       torch.tensor([2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 0.0]))


def test_sce_erases_minority_signs():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, -1.0, 0.0])
    b = torch.tensor([1.0, -3.0, 1.0, 2.0])
    # equal mean squares (a: 3/4, b: 15/4): w = [1/6, 5/6]. Element 0: both -> 1. Element 1: majority -, only b.
    # Element 2: sum 0 -> majority +, only b. Element 3: only b.
    assert_close(fusion.sce(base, [a, b]), torch.tensor([1.0, -3.0, 1.0, 2.0]), **TIGHT)


def test_sce_int8_mask_changes_nothing():
    base, xs = sparse_models((8, 6), 3, seed=8)
    for topk in (1.0, 0.5):
        assert torch.equal(fusion.sce(base, xs, select_topk=topk, int8_mask=True),
                           fusion.sce(base, xs, select_topk=topk))


# ------------------------------------------------------------------------------------------------- Arcee Fusion


def fusion_reference(base, x):
    """Float64, row by row: p, q = softmax + 1e-8; KL per row; importance = |x - base| * KL; threshold = median +
    1.5 IQR from the sorted importances at int(q * (n - 1)); take x where importance >= threshold."""
    width = base.shape[-1] if base.dim() else 1
    b, xv = values(base), values(x)
    importance = []
    for start in range(0, len(b), width):
        rb, rx = b[start:start + width], xv[start:start + width]

        def softmax(row):
            top = max(row)
            e = [math.exp(v - top) for v in row]
            return [v / sum(e) + 1e-8 for v in e]

        p, q = softmax(rx), softmax(rb)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        importance += [abs(xe - be) * kl for xe, be in zip(rx, rb)]
    ordered = sorted(importance)
    q1, median, q3 = (ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    out = [xe if imp >= threshold else be for xe, be, imp in zip(xv, b, importance)]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape), threshold


@pytest.mark.parametrize("shape", [(12, 9), (40,), (3, 6, 8), (50, 33)])
def test_arcee_fusion_is_its_formula(shape):
    base = rand(*shape, seed=20)
    x = base + 0.3 * rand(*shape, seed=21) * (rand(*shape, seed=22) > 0)
    expected, _ = fusion_reference(base, x)
    out = fusion.arcee_fusion(base, [x])
    assert_close(out, expected.float(), **TIGHT)
    taken = out != base
    assert 0 < int(taken.sum()) < out.numel()  # the gate took some of x, not all
    assert_close(out[taken], x[taken], **TIGHT)  # base + (x - base): x, to float32 rounding


def test_arcee_fusion_threshold_is_median_plus_one_and_a_half_iqr_by_index():
    # n = 10: positions int(0.25 * 9) = 2, int(4.5) = 4, int(6.75) = 6 of the sorted values (no interpolation).
    importance = torch.tensor([9.0, 0.0, 7.0, 2.0, 5.0, 3.0, 8.0, 1.0, 6.0, 4.0])
    assert float(fusion._fusion_threshold(importance, None)) == 4 + 1.5 * (6 - 2)
    # n = 101 of 0..100: positions 25, 50, 75.
    assert float(fusion._fusion_threshold(torch.arange(101.0).flip(0), None)) == 50 + 1.5 * 50


def test_arcee_fusion_takes_exactly_one_other_model():
    base = rand(4, 4, seed=1)
    with pytest.raises(ValueError, match="exactly one"):
        fusion.arcee_fusion(base, [])
    with pytest.raises(ValueError, match="exactly one"):
        fusion.arcee_fusion(base, [base + 1, base + 2])
    with pytest.raises(ValueError):
        fusion.arcee_fusion(base, [base[:-1]])


def test_arcee_fusion_up_to_a_million_elements_draws_nothing():
    base = rand(1000, 1000, seed=30)  # exactly 1,000,000: not more than the sample size
    x = base + 0.01 * rand(1000, 1000, seed=31)
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    out = fusion.arcee_fusion(base, [x], generator=g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(out, fusion.arcee_fusion(base, [x], generator=torch.Generator().manual_seed(99)))


def test_arcee_fusion_above_a_million_elements_samples_the_quantiles():
    shape = (1001, 1000)
    base = rand(*shape, seed=40)
    # deltas large enough that the row KL (a sum of terms cancelling to second order) keeps float32's precision
    x = base + 0.3 * rand(*shape, seed=41)
    out = fusion.arcee_fusion(base, [x], generator=torch.Generator().manual_seed(5))
    # the same seed in torch's global generator (mergekit's) draws the same positions
    with torch.random.fork_rng():
        torch.manual_seed(5)
        assert torch.equal(fusion.arcee_fusion(base, [x]), out)
    assert not torch.equal(fusion.arcee_fusion(base, [x], generator=torch.Generator().manual_seed(6)), out)

    # the formula, vectorized in float64: quantiles of 1,000,000 importances at torch.randint positions
    b, xd = base.double(), x.double()
    p = torch.softmax(xd, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    importance = ((xd - b).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)).reshape(-1)
    positions = torch.randint(importance.numel(), (1_000_000,), generator=torch.Generator().manual_seed(5))
    ordered = importance[positions].sort().values
    q1, median, q3 = (ordered[int(q * 999_999)] for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    take = (importance >= threshold).reshape(shape)
    # float32 and float64 importances may fall on either side of the threshold only when within rounding of it
    close = ((importance - threshold).abs() <= 1e-5 * threshold).reshape(shape)
    assert int(close.sum()) < 50
    expected = torch.where(take, x, base)
    assert_close(out[~close], expected[~close], **TIGHT)


# ---------------------------------------------------------------------------------------------------------- RAM


def ram_reference(base, xs, epsilon=1e-5, plus=None):
    """plus: (r, alpha) for RAM+ (tensor-local): unique deltas of model i times 1 + r * clamp(S_i / max(U_i, eps),
    0, alpha)."""
    b, d = deltas64(base, xs)
    n, size = len(d), len(b)
    nz = [[abs(d[i][e]) > epsilon for e in range(size)] for i in range(n)]
    count = [sum(nz[i][e] for i in range(n)) for e in range(size)]
    lam = [1.0] * n
    if plus is not None:
        r, alpha = plus
        for i in range(n):
            shared = sum(nz[i][e] and count[e] > 1 for e in range(size))
            unique = sum(nz[i][e] and count[e] == 1 for e in range(size))
            rho = shared / max(unique, epsilon)
            lam[i] = 1 + r * min(max(rho, 0), alpha)
    out = []
    for e in range(size):
        total = 0.0
        for i in range(n):
            if nz[i][e]:
                total += d[i][e] * lam[i] if count[e] == 1 else d[i][e] / count[e]
        out.append(b[e] + total)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_is_its_formula(n, epsilon):
    base, xs = sparse_models((10, 7), n, seed=50 + n)
    assert_close(fusion.ram(base, xs, epsilon=epsilon), ram_reference(base, xs, epsilon).float(), **TIGHT)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("params", [{}, {"r": 0.5, "alpha": 1.0}, {"r": 1.0, "alpha": 50.0, "epsilon": 0.05}])
def test_ramplus_tl_is_its_formula(n, params):
    base, xs = sparse_models((10, 7), n, seed=60 + n)
    p = {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2, **params}
    expected = ram_reference(base, xs, p["epsilon"], plus=(p["r"], p["alpha"]))
    assert_close(fusion.ramplus_tl(base, xs, **params), expected.float(), **TIGHT)


# Exact binary fractions, epsilon 0.25: a delta of exactly 0.25 does not count (|d| > epsilon, strictly).
EXACT_A = torch.tensor([0.25, 0.5, 0.125, 0.0, 0.75])
EXACT_B = torch.tensor([0.5, 0.25, 0.5, 0.25, 0.75])


def test_ram_epsilon_is_a_strict_threshold():
    base = torch.zeros(5)
    # counts per element: 1 (B), 1 (A), 1 (B), 0, 2
    assert torch.equal(fusion.ram(base, [EXACT_A, EXACT_B], epsilon=0.25), torch.tensor([0.5, 0.5, 0.5, 0.0, 0.75]))
    # epsilon 0: every nonzero delta counts
    assert torch.equal(fusion.ram(base, [EXACT_A, EXACT_B], epsilon=0.0),
                       torch.tensor([0.375, 0.375, 0.3125, 0.25, 0.75]))
    # a lone model's deltas at or below epsilon are dropped, not kept
    small = rand(6, 4, seed=3)
    assert torch.equal(fusion.ram(small, [small + 1e-6]), small)


def test_ramplus_tl_lambda_and_its_clamp():
    base = torch.zeros(5)
    # A: nonzero at 1 (unique) and 4 (shared): rho = 1/1. B: at 0, 2 (unique) and 4 (shared): rho = 1/2.
    # r 0.5, alpha 0.75: lambda_A = 1 + 0.5 * min(1, 0.75) = 1.375 (clamped), lambda_B = 1 + 0.5 * 0.5 = 1.25.
    out = fusion.ramplus_tl(base, [EXACT_A, EXACT_B], epsilon=0.25, r=0.5, alpha=0.75)
    assert torch.equal(out, torch.tensor([0.5 * 1.25, 0.5 * 1.375, 0.5 * 1.25, 0.0, 0.75]))
    # alpha below 0: clamp(rho, 0, alpha) is alpha, lambda = 1 + r * alpha = 0.75 for both
    out = fusion.ramplus_tl(base, [EXACT_A, EXACT_B], epsilon=0.25, r=0.5, alpha=-0.5)
    assert torch.equal(out, torch.tensor([0.375, 0.375, 0.375, 0.0, 0.75]))
    # defaults: rho >= 0.2 for both, so lambda = 1 + 0.1 * 0.2 for both
    out = fusion.ramplus_tl(base, [EXACT_A, EXACT_B], epsilon=0.25)
    assert_close(out, torch.tensor([0.5 * 1.02, 0.5 * 1.02, 0.5 * 1.02, 0.0, 0.75]), **TIGHT)


def test_ramplus_tl_without_amplification_is_ram():
    base, xs = sparse_models((10, 7), 3, seed=70)
    assert torch.equal(fusion.ramplus_tl(base, xs, r=0.0), fusion.ram(base, xs))
    assert torch.equal(fusion.ramplus_tl(base, xs, alpha=0.0), fusion.ram(base, xs))


def test_ramplus_tl_model_without_unique_elements():
    # Both models change the same elements: U = 0, rho = S / epsilon, clamped to alpha; nothing unique to scale.
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert torch.equal(fusion.ramplus_tl(base, [a, b]), torch.tensor([2.0, 3.0, 0.0, 0.0]))


@pytest.mark.parametrize("method", [fusion.ram, fusion.ramplus_tl])
def test_ram_no_other_models_returns_base(method):
    base = rand(5, 4, seed=9)
    assert torch.equal(method(base, []), base)


# ------------------------------------------------------------------------------------------------------ shared


@pytest.mark.parametrize("method", [fusion.sce, fusion.ram, fusion.ramplus_tl, fusion.arcee_fusion])
def test_inputs_are_computed_in_float32(method):
    base, xs = sparse_models((8, 6), 1, seed=80)
    base16, xs16 = base.bfloat16(), [x.bfloat16() for x in xs]
    out = method(base16, xs16)
    assert out.dtype == torch.float32
    assert torch.equal(out, method(base16.float(), [x.float() for x in xs16]))


@pytest.mark.parametrize("method", [fusion.sce, fusion.ram, fusion.ramplus_tl])
def test_unequal_shapes_are_rejected(method):
    base = rand(5, 4, seed=1)
    with pytest.raises(ValueError, match="shapes differ"):
        method(base, [base + 1, base[:-1]])


# ---------------------------------------------------------------------------------------------------- streamed
#
# sce, arcee_fusion and ramplus_tl stream (composer.methods.method.Streaming): statistics passes over blocks, then
# the output block by block. Run here through the merge engine (composer.merging.Merged) on inputs held in memory,
# with statistics blocks of 500 elements (each computed in pieces of 200), blend steps of 200 and output pieces of
# 3072 elements, so that every tensor spans several blocks, rows are cut across blocks, pieces and steps, and
# compared with the whole-tensor formulas above.

BLOCK, CHUNK, PIECE = 500, 200, 3 * 4096


class _Memory:
    """The engine's sources, in memory: input k's elements [start, stop) are those of the k-th tensor."""

    def __init__(self, xs):
        self.xs = [x.reshape(-1) for x in xs]

    def tensor(self, info, start, stop, staged=False):
        return self.xs[int(info.name)][start:stop]


def _plan(method, xs, shared):
    from composer.methods import METHODS
    from composer.sources import TensorInfo
    from composer.tensorplan import TensorPlan

    m = METHODS[method]
    inputs = tuple(TensorInfo(str(k), "F32", tuple(xs[0].shape), None, 0) for k in range(len(xs)))
    return TensorPlan("w", method, inputs, tuple(f"m{k}" for k in range(len(xs))), "F32",
                      params=tuple({**m.shared, **(shared or {})}.items()),
                      input_params=tuple(tuple(m.per_input.items()) for _ in xs), base=0)


@pytest.fixture
def small_blocks(monkeypatch):
    import sys

    from composer import ranked

    monkeypatch.setattr(ranked, "BLOCK", BLOCK)
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", CHUNK)


def streamed(method, xs, shared=None, seed=0):
    """(the engine's result, its streaming shape) for inputs xs, the base first."""
    from composer.merging import Merged, merge_mode

    t = _plan(method, xs, shared)
    out = bytearray(t.nbytes)
    merged = Merged(_Memory(xs), seed)
    for start in range(0, t.nbytes, PIECE):
        merged.copy_into(t, memoryview(out)[start: start + PIECE], start)
    return torch.frombuffer(out, dtype=torch.float32).reshape(xs[0].shape), merge_mode(t)


def whole(method, xs, shared=None, seed=0):
    """The formula on whole tensors, with the generator the engine seeds for tensor "w"."""
    from composer.blocks import tensor_seed
    from composer.methods import METHODS

    m = METHODS[method]
    generator = torch.Generator().manual_seed(tensor_seed(seed, "w")) if m.random else None
    return m.apply(xs[1:], base=xs[0], shared=shared, generator=generator)


# (5, 40000): rows longer than the blocks, each block of them two or more whole rows (three at the end: never a
# lone row, whose KL torch would reduce on several threads); (1500,): one row; (4, 6, 35): rows along the last dim.
STREAM_SHAPES = [(37, 29), (5, 40000), (1500,), (4, 6, 35)]


@pytest.mark.parametrize("shape", STREAM_SHAPES)
@pytest.mark.parametrize(("method", "n", "shared"), [
    ("ramplus_tl", 3, {"epsilon": 0.05, "r": 0.5, "alpha": 0.5}),
    ("ramplus_tl", 2, None),
    ("ramplus_tl", 0, None),
    ("arcee_fusion", 1, None),
])
def test_streamed_ramplus_tl_and_arcee_fusion_are_their_formulas(small_blocks, shape, method, n, shared):
    """Bit for bit: ramplus_tl's counts are integers (block sums exact), arcee_fusion's row KLs are computed on
    whole rows as the formula computes them, and the rest is the formulas' elementwise arithmetic."""
    base, xs = sparse_models(shape, n, seed=len(shape) + n)
    got, mode = streamed(method, [base, *xs], shared)
    assert mode == {"ramplus_tl": "statistics", "arcee_fusion": "row statistics"}[method]
    assert torch.equal(got, whole(method, [base, *xs], shared))


@pytest.mark.parametrize("shape", [(301, 40), (5, 40000), (20000,)])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_arcee_fusion_samples_the_formulas_positions(small_blocks, monkeypatch, shape, seed):
    """Above QUANTILE_SAMPLE elements (made small here) the quantiles come from QUANTILE_SAMPLE positions drawn from
    the job's generator: the streamed pass gathers the importances at the very positions the formula draws (in
    another order, which the sort undoes), so the threshold and the output are the formula's."""
    monkeypatch.setattr(fusion, "QUANTILE_SAMPLE", 3000)
    base = rand(*shape, seed=90 + seed)
    xs = [base, base + 0.3 * rand(*shape, seed=91 + seed)]
    got, _ = streamed("arcee_fusion", xs, seed=seed)
    assert torch.equal(got, whole("arcee_fusion", xs, seed=seed))
    assert not torch.equal(got, whole("arcee_fusion", xs, seed=seed + 7))  # the draw matters: it is the one used


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_sce_variance_is_torch_var_bit_for_bit(dtype, n):
    """The streamed passes' variance across models is torch.var's (which the formula and mergekit take), bit for
    bit: the same float64 Welford updates in the same order. In float64 any other order of operations shows (a
    two-pass mean of squared deviations differs in about a third of the elements); in float32, after rounding."""
    g = torch.Generator().manual_seed(n)
    d = (torch.randn(n, 50_000, generator=g) * torch.rand(n, 1, generator=g) * 3).to(dtype)
    for x in (d, (d * 64).round() / 256):  # and one with ties everywhere
        assert torch.equal(fusion._sce_variance(x), torch.var(x, dim=0, unbiased=False))


@pytest.mark.parametrize("shape", [(37, 29), (5, 40000), (3, 300000), (1500,)])
def test_streamed_arcee_fusion_row_kl_and_threshold_are_the_formulas(small_blocks, monkeypatch, shape):
    """The statistics themselves, bit for bit: every row's KL and the threshold (sampled above QUANTILE_SAMPLE
    elements, 3000 here). Rows of 32K elements or more are where a block holding a lone row would differ (torch
    reduces one long row on several threads, many rows one thread each): the blocks never do."""
    from composer.methods import METHODS, MergeJob

    monkeypatch.setattr(fusion, "QUANTILE_SAMPLE", 3000)

    base = rand(*shape, seed=100)
    x = base + 0.3 * rand(*shape, seed=101)
    job = MergeJob.of(_plan("arcee_fusion", [base, x], None), METHODS["arcee_fusion"], sources=_Memory([base, x]),
                      block=BLOCK, chunk=CHUNK)
    width, kl, threshold = fusion._fusion_prepare(job)
    assert width == shape[-1]
    assert torch.equal(kl, fusion._fusion_kl(x, base).reshape(-1))
    assert torch.equal(threshold, fusion._fusion_threshold(fusion._fusion_importance(x, base), job.generator()))


def _sce_inputs(shape, n, seed, ties):
    """A base and n models; with `ties` the deltas are multiples of 1/4 in [-1, 1], so variances tie everywhere
    and every top-k cut falls inside a run of equal values."""
    if not ties:
        return sparse_models(shape, n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randint(-4, 5, shape, generator=g).float() / 4 for _ in range(n)]


def _sce_job(xs, shared):
    from composer.methods import METHODS, MergeJob

    return MergeJob.of(_plan("sce", xs, shared), METHODS["sce"], sources=_Memory(xs), block=BLOCK, chunk=CHUNK)


U_F32 = 2.0**-24  # float32's unit roundoff: one rounding moves a value v by at most |v| * U_F32
# torch's float32 sum over a whole tensor (its cascade summation), as sce's formula takes the mean squares: measured
# within 2.3 U_F32 of the exact sum for random squares of up to 2^20 elements (log2(numel) roundings is the usual
# worst-case bound of pairwise summation; it is not approached).
TORCH_SUM = 2.5


def sce_bounds(n: int) -> tuple[float, float, float]:
    """In units of U_F32, for n task vectors: (streamed weights vs the exact ones, relative; streamed vs the
    formula's weights, relative; streamed vs the formula's output, in units of S = |base| + sum|x_i| + sum|d_i|).

    - streamed mean squares m_i: float64 sums (error ~numel * 2^-53: nil) rounded once to float32, then divided by
      numel: within 2. The weights w_i = m_i / T, T the float32 sum of the n m_j (n - 1 roundings, and m's error):
      2 + (2 + n - 1) + 1 = n + 4.
    - the formula's m_i: torch's sum error, then the division: TORCH_SUM + 1; its weights 2 * TORCH_SUM + n + 2.
    - the output, merged = sum_i(w_i k_i d_i) / sum_i(w_i k_i): scaling every w_i alike (T) changes nothing, so
      only each w_i's own error counts (ours 2 + 1, the formula's TORCH_SUM + 1 + 1); merged moves by at most the
      spread of those relative errors, 2 * (TORCH_SUM + 5), times max|d_i - merged| <= S (the kept d_i share
      merged's sign). On top, each side's own roundings: the products and the sum (no cancellation: the kept d_i
      share a sign), the denominator's sum and the division (4 of merged's size each side), base + merged (one of
      the output's size each side, i.e. 2 for its possible flip): 2 * (TORCH_SUM + 5) + 8 + 2.
    """
    ours, formula = n + 4, 2 * TORCH_SUM + n + 2
    return ours, ours + formula, 2 * (TORCH_SUM + 5) + 10


@pytest.mark.parametrize("shape", [(37, 29), (5, 40000), (1500,), (4, 6, 35)])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("ties", [False, True])
def test_streamed_sce_is_its_formula_within_the_mean_squares_rounding(small_blocks, shape, select_topk, ties):
    """The selection is the formula's exactly (the same k, the same elements, ties kept in index order: ranked's
    histogram passes over var recomputed per block); the weights come from float64 sums of the squared masked
    deltas over blocks, where the formula takes torch's float32 mean over the whole tensor: within sce_bounds.
    (Observed: weights within 2.0 U_F32 of the exact ones and 3.9 of the formula's, outputs within 1.1 U_F32 * S
    of the formula's.)"""
    n = 2
    base, xs = _sce_inputs(shape, n, seed=len(shape) + int(10 * select_topk), ties=ties)
    shared = {"select_topk": select_topk}
    got, mode = streamed("sce", [base, *xs], shared)
    assert mode == ("ranked" if select_topk < 1 else "statistics")
    expected = whole("sce", [base, *xs], shared)
    deltas = torch.stack([x - base for x in xs])
    if select_topk < 1:  # the selection, exactly
        from composer.methods.common import unpack_mask

        packed, _ = fusion._sce_prepare(_sce_job([base, *xs], shared))  # the blend's masks, one per block
        numel = deltas[0].numel()
        blocks = [(a, min(numel, a + BLOCK)) for a in range(0, numel, BLOCK)]
        mask = torch.cat([unpack_mask(packed.slot(a, b, 0), 0, b - a) for a, b in blocks])
        assert packed.data.shape == (len(blocks), 1, -(-BLOCK // 8))
        assert torch.equal(mask, fusion._sce_mask(deltas, select_topk).reshape(-1))
        deltas = deltas * mask.reshape(deltas.shape[1:]).unsqueeze(0)
    ours, apart, output = sce_bounds(n)
    _, w = fusion._sce_prepare(_sce_job([base, *xs], shared))
    squares = deltas.double().square().reshape(n, -1).mean(dim=1)
    exact = squares / squares.sum()
    assert ((w.double() - exact).abs() <= ours * U_F32 * exact).all(), (w.double() - exact) / exact / U_F32
    formula = fusion._sce_weights(deltas).double()
    assert ((w.double() - formula).abs() <= apart * U_F32 * exact).all(), (w.double() - formula) / exact / U_F32
    scale = base.abs() + sum(x.abs() for x in xs) + deltas.abs().sum(dim=0).reshape(shape)
    error = (got - expected).abs() / (U_F32 * scale)
    assert (error <= output).all(), error.max()


def test_streamed_sce_edge_cases(small_blocks):
    """No models besides the base, zero task vectors, k = 0 and select_topk >= 1: the formula's results."""
    base, xs = sparse_models((37, 29), 2, seed=3)
    assert torch.equal(streamed("sce", [base])[0], base)
    same = [base, base.clone(), base.clone()]
    for topk in (1.0, 0.5):
        assert torch.equal(streamed("sce", same, {"select_topk": topk})[0], base)
    tiny = {"select_topk": 1e-4}  # k = int(1073 * 1e-4) = 0: nothing selected
    assert torch.equal(streamed("sce", [base, *xs], tiny)[0], whole("sce", [base, *xs], tiny))
    assert torch.equal(streamed("sce", [base, *xs], {"select_topk": 1.5})[0],
                       streamed("sce", [base, *xs])[0])


@pytest.mark.parametrize(("method", "params", "mode"), [
    ("sce", "{select_topk: 0.4}", "ranked"),
    ("sce", "{int8_mask: true}", "statistics"),
    ("arcee_fusion", "{}", "row statistics"),
    ("ramplus_tl", "{epsilon: 0.05, r: 0.5, alpha: 0.5}", "statistics"),
])
def test_streamed_merges_through_the_cli(models, write_recipe, tmp_path, monkeypatch, method, params, mode):
    """The real CLI on the tiny checkpoints (small blocks, chunks and output pieces; arcee_fusion sampling its
    quantiles above 5000 elements): every tensor streamed, and equal to the formula on whole tensors (sce: within
    the mean squares' rounding, as above)."""
    import sys

    from click.testing import CliRunner

    from composer import plan_recipe, ranked
    from composer.blocks import tensor_seed
    from composer.cli import main
    from composer.methods import METHODS
    from composer.tensorplan import merge_mode
    from tinymodels import load_state_dict

    monkeypatch.setattr(ranked, "BLOCK", BLOCK)
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", CHUNK)
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_BYTES", PIECE)
    monkeypatch.setattr(fusion, "QUANTILE_SAMPLE", 5000)
    names = ["llama", "llama-b"] if method == "arcee_fusion" else ["llama", "llama-b", "llama-c"]
    recipe = write_recipe(f"merge_method: {method}\nbase_model: {models['llama']}\ndtype: float32\n"
                          f"parameters: {params}\nmodels: [{', '.join(f'{{model: {models[m]}}}' for m in names)}]\n")
    plan = plan_recipe(recipe)
    assert {merge_mode(t) for t in plan.tensors} == {mode}
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out = load_state_dict(tmp_path / "out")
    inputs = [load_state_dict(models[m]) for m in names]
    spec = METHODS[method]
    for t in plan.tensors:
        xs = [sd[t.name].float() for sd in inputs]
        generator = torch.Generator().manual_seed(tensor_seed(0, t.name)) if spec.random else None
        expected = spec.apply(xs[1:], base=xs[0], shared=dict(t.params), generator=generator)
        if method == "sce":
            scale = sum(x.abs() for x in xs) + sum((x - xs[0]).abs() for x in xs[1:])
            assert ((out[t.name] - expected).abs() <= sce_bounds(2)[2] * U_F32 * scale).all(), t.name
        else:
            assert torch.equal(out[t.name], expected), t.name


def test_order_statistics_are_sorting_s():
    """arcee_fusion's streamed threshold takes order statistics without sorting: each equals torch.sort's value at
    that rank, with long runs of equal values, negatives, signed zeros, one bin holding everything, and NaN."""
    g = torch.Generator().manual_seed(11)
    cases = [torch.rand(200_000, generator=g) * torch.rand(200_000, generator=g) * 1e-3,
             torch.randint(-3, 4, (50_000,), generator=g).float() / 8,  # 7 values: every rank inside a run
             torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.0]),
             torch.full((1000,), 0.25),
             torch.tensor([1.0, float("nan"), -3.0, 2.0, float("inf")])]
    for x in cases:
        ordered, n = torch.sort(x).values, x.numel()
        ranks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
        got = fusion.order_statistics(x, ranks)
        for r, value in zip(ranks, got):
            assert value.item() == ordered[r].item() or (value.isnan() and ordered[r].isnan()), (r, value, ordered[r])
        if not bool(x.isnan().any()):  # the kernel's (composer.native.order_statistics) and torch's: the same bits
            fast = native.order_statistics(x, ranks)
            assert fast is not None
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(native, "order_statistics", lambda *a: None)
                slow = fusion.order_statistics(x, ranks)
            assert [int(v.view(torch.int32)) for v in fast] == [int(v.view(torch.int32)) for v in slow]
