"""composer.methods: each merge method against its formula written out plainly, plus mergekit's edge cases."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from composer import methods as M
from composer.methods import sparsify
from composer.methods import METHODS
from tinymodels import plain_uniform

# Where a test formula sums or multiplies in a different order than the implementation, results can differ by a
# few float32 ulps; TIGHT allows that and nothing more.
TIGHT = dict(rtol=1e-6, atol=1e-6)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def models():
    base = rand(16, 12, seed=1)
    return base, [base + 0.1 * rand(16, 12, seed=s) for s in (2, 3, 4)]


W = [0.6, 0.9, 0.5]


# ---------------------------------------------------------------------------------------------- linear


def test_linear_is_the_weighted_mean(models):
    base, (a, b, c) = models
    x = [base, a, b]
    w = [0.2, 0.5, 0.3]
    assert_close(M.linear(x, w), (0.2 * base + 0.5 * a + 0.3 * b) / (0.2 + 0.5 + 0.3), **TIGHT)
    assert_close(M.linear(x, w, normalize=False), 0.2 * base + 0.5 * a + 0.3 * b, **TIGHT)
    assert_close(M.linear([a, b], [3.0, 3.0]), (a + b) / 2, **TIGHT)


def test_linear_zero_weight_sum_is_an_error_not_nan(models):
    _, (a, b, _) = models
    with pytest.raises(ValueError, match="sum to zero"):
        M.linear([a, b], [1.0, -1.0])
    assert torch.equal(M.linear([a, b], [1.0, -1.0], normalize=False), a - b)


def test_unequal_shapes_are_rejected(models):
    base, (a, _, _) = models
    short = a[:-1]
    for call in (
        lambda: M.linear([a, short], [1, 1]),
        lambda: M.slerp(base, short, 0.5),
        lambda: M.nuslerp([a, short], [1, 1]),
        lambda: M.task_arithmetic(base, [short], [1]),
        lambda: M.ties(base, [a, short], [1, 1], [0.5, 0.5]),
        lambda: M.dare_linear(base, [short], [1], [0.5], generator=torch.Generator()),
        lambda: M.model_stock(base, [a, short]),
    ):
        with pytest.raises(ValueError, match="shapes differ"):
            call()


def test_inputs_are_computed_in_float32(models):
    base, (a, _, _) = models
    out = M.linear([base.bfloat16(), a.bfloat16()], [1, 1])
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- slerp


def plain_slerp(a, b, t):
    """Textbook slerp over the flattened tensors, in float64."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / torch.sin(theta)
    return out.reshape(a.shape).float()


def test_slerp_matches_the_formula(models):
    base, (a, _, _) = models
    other = rand(16, 12, seed=9)  # far from base, so the spherical branch is taken
    for t in (0.1, 0.3, 0.5, 0.9):
        # float32 vs float64 reference: relative error of a few ulps in the angle and the sums
        assert_close(M.slerp(base, other, t), plain_slerp(base, other, t), rtol=1e-5, atol=1e-5)


def test_slerp_of_orthogonal_unit_vectors():
    out = M.slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), **TIGHT)


def test_slerp_endpoints_are_exact(models):
    base, (a, _, _) = models
    assert torch.equal(M.slerp(base, a, 0.0), base)
    assert torch.equal(M.slerp(base, a, 1.0), a)


def test_slerp_is_symmetric(models):
    base = models[0]
    other = rand(16, 12, seed=9)
    for t in (0.2, 0.35, 0.5):
        # 1 - t is rounded to float32 and the sum's operands swap: equal up to float32 rounding
        assert_close(M.slerp(base, other, t), M.slerp(other, base, 1 - t), rtol=1e-5, atol=1e-6)


def test_slerp_near_parallel_falls_back_to_lerp(models):
    base = models[0]
    near = base * 1.0001 + 1e-4 * rand(16, 12, seed=5)  # |cos| > 0.9995
    anti = -2.0 * base  # cos = -1
    for other in (near, anti, 3.0 * base):
        # t = 0.25 is exact in binary, so (1 - t) rounds the same in float32 and in Python
        assert torch.equal(M.slerp(base, other, 0.25), 0.75 * base + 0.25 * other)


def test_slerp_threshold_is_mergekits_0_9995():
    a = torch.tensor([1.0, 0.0])
    just_inside = torch.tensor([math.cos(0.03), math.sin(0.03)])  # cos = 0.99955 > 0.9995: linear
    just_outside = torch.tensor([math.cos(0.033), math.sin(0.033)])  # cos = 0.99946: spherical
    assert torch.equal(M.slerp(a, just_inside, 0.25), 0.75 * a + 0.25 * just_inside)
    assert not torch.equal(M.slerp(a, just_outside, 0.25), 0.75 * a + 0.25 * just_outside)
    assert_close(M.slerp(a, just_outside, 0.25), plain_slerp(a, just_outside, 0.25), rtol=1e-5, atol=1e-6)


def test_slerp_zero_tensor_does_not_divide_by_zero(models):
    base = models[0]
    out = M.slerp(base, torch.zeros_like(base), 0.5)
    assert torch.isfinite(out).all()
    # a zero norm is replaced by 1, so cos = 0 and theta = pi/2: coefficient sin(pi/4) / 1 on base
    assert_close(out, base * math.sin(math.pi / 4), **TIGHT)


def test_slerp_sums_are_near_exact_and_cover_every_element():
    """slerp_sums: float32 sums over runs of SLERP_RUN elements (tail included), added in float64: within a few
    float32 ulps of the exact float64 sums for a 2**20-element block plus a tail (one float32 reduction over the
    block errs by hundreds)."""
    from composer.methods import spherical as averaging

    n = 2**20 + 777  # a partial run at the end
    a = (0.02 * rand(n, seed=11)).bfloat16().float()
    b = (a + 0.002 * rand(n, seed=12)).bfloat16().float()
    got = averaging.slerp_sums(torch.stack([a, b]))
    a64, b64 = a.double(), b.double()
    exact = torch.stack([a64 @ a64, b64 @ b64, a64 @ b64])
    assert ((got - exact).abs() / exact.abs()).max() < 8 * 2.0**-24
    b[-1] += 1.0  # the tail counts
    assert averaging.slerp_sums(torch.stack([a, b]))[1] > got[1] + 0.5


def test_slerp_does_not_depend_on_the_thread_count():
    """A reduction over a long float32 tensor is split among torch's threads, so its bits depend on their number
    (mergekit's slerp norms and dot product do). composer's coefficients come from runs reduced on one thread each:
    the same on any machine's core count."""
    from composer.methods import spherical as averaging

    threads = torch.get_num_threads()
    try:
        for seed in range(6):
            a = 0.02 * rand(2**21 + 5, seed=20 + seed)
            b = a + 0.002 * rand(2**21 + 5, seed=40 + seed)
            coefficients = []
            for n in (1, 2, 4):
                torch.set_num_threads(n)
                pair = torch.stack([a, b])
                coefficients.append(averaging.slerp_coefficients(lambda s, e: pair[:, s:e], a.numel(), 0.3))
            assert all(torch.equal(c[0], coefficients[0][0]) and torch.equal(c[1], coefficients[0][1])
                       for c in coefficients), seed
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- nuslerp


def test_nuslerp_flattened_is_slerp_at_w1_over_sum(models):
    base = models[0]
    other = rand(16, 12, seed=9)
    assert_close(M.nuslerp([base, other], [1.0, 3.0]), plain_slerp(base, other, 0.75), rtol=1e-5, atol=1e-5)


def test_nuslerp_with_base_interpolates_task_vectors(models):
    base, (a, b, _) = models
    expected = base + plain_slerp(a - base, b - base, 2 / 3)
    assert_close(M.nuslerp([a, b], [1.0, 2.0], base=base), expected, rtol=1e-5, atol=1e-5)


def test_nuslerp_row_and_column_modes(models):
    base, (a, b, _) = models
    rows = torch.stack([plain_slerp(a[i], b[i], 0.25) for i in range(a.shape[0])])
    cols = torch.stack([plain_slerp(a[:, j], b[:, j], 0.25) for j in range(a.shape[1])], dim=1)
    assert_close(M.nuslerp([a, b], [3.0, 1.0], nuslerp_flatten=False), rows, rtol=1e-5, atol=1e-5)
    assert_close(
        M.nuslerp([a, b], [3.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True), cols, rtol=1e-5, atol=1e-5
    )


def test_nuslerp_zero_weight_sum_uses_t_half_and_exact_parallel_lerps(models):
    base, (a, _, _) = models
    other = rand(16, 12, seed=9)
    assert torch.equal(M.nuslerp([base, other], [1.0, -1.0]), M.nuslerp([base, other], [1.0, 1.0]))
    # mergekit lerps only when 1 - cos^2 <= 1e-16: in float32, only when cos rounds to exactly +-1
    e = torch.tensor([0.0, 3.0, 0.0])
    assert torch.equal(M.nuslerp([e, 2 * e], [3.0, 1.0]), 0.75 * e + 0.25 * (2 * e))
    assert torch.equal(M.nuslerp([e, -e], [3.0, 1.0]), 0.75 * e + 0.25 * -e)
    # parallel random tensors have cos a few ulps off 1: the spherical branch, close to the lerp anyway
    assert_close(M.nuslerp([a, 2 * a], [3.0, 1.0]), 0.75 * a + 0.25 * (2 * a), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError):
        M.nuslerp([a], [1.0])


# ------------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_formula(models):
    base, xs = models
    tv = sum(w * (x - base) for w, x in zip(W, xs))
    assert_close(M.task_arithmetic(base, xs, W), base + tv, **TIGHT)
    assert_close(M.task_arithmetic(base, xs, W, normalize=True), base + tv / sum(W), **TIGHT)
    assert_close(M.task_arithmetic(base, xs, W, lambda_=0.7), base + 0.7 * tv, **TIGHT)
    # densities, rescale and int8_mask are accepted and ignored
    assert torch.equal(M.task_arithmetic(base, xs, W, [0.1] * 3, rescale=True, int8_mask=True), M.task_arithmetic(base, xs, W))
    assert torch.equal(M.task_arithmetic(base, [], []), base)


def test_task_arithmetic_zero_weight_sum_skips_normalization(models):
    base, (a, b, _) = models
    expected = base + ((a - base) - (b - base))
    assert_close(M.task_arithmetic(base, [a, b], [1.0, -1.0], normalize=True), expected, **TIGHT)


# ------------------------------------------------------------------------------------------------ ties


def test_ties_sign_election_by_hand():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, -1.0, -5.0, 0.0])]
    # column sums -1, -2, -1, 0: majority sign -, -, -, + (a zero sum elects +)
    # kept: [-3], [-2, -1], [-5], [] -> disjoint means -3, -1.5, -5, 0 (no kept weight: divisor 1)
    assert torch.equal(M.ties(base, xs, [1, 1, 1]), torch.tensor([-3.0, -1.5, -5.0, 0.0]))
    assert torch.equal(M.ties(base, xs, [1, 1, 1], normalize=False), torch.tensor([-3.0, -3.0, -5.0, 0.0]))
    assert torch.equal(M.ties(base, xs, [1, 1, 1], int8_mask=True), M.ties(base, xs, [1, 1, 1]))
    # weighted deltas vote: with the second model at 3x the column sums are -7, 0, 1, 0: signs -, +, +, +
    assert torch.equal(M.ties(base, xs, [1, 3, 1], normalize=False), torch.tensor([-9.0, 3.0, 6.0, 0.0]))
    assert torch.equal(M.ties(base, xs, [1, 3, 1]), torch.tensor([-3.0, 1.0, 1.5, 0.0]))
    # density 0.5 keeps the top 2 of 4 |values| per model before the election
    trimmed = [torch.tensor([0.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -5.0, 0.0])]
    assert torch.equal(M.ties(base, xs, [1, 1, 1], [0.5] * 3), M.ties(base, trimmed, [1, 1, 1]))


def plain_topk(d, density):
    k = max(1, int(density * d.numel()))
    threshold = d.abs().flatten().sort(descending=True).values[k - 1]
    return d * (d.abs() >= threshold)  # random floats: no ties at the threshold


def plain_ties(base, xs, w, dens, normalize=True, lam=1.0, trim=plain_topk):
    deltas = torch.stack([wi * trim(x - base, di) for x, wi, di in zip(xs, w, dens)])
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    keep = deltas.sign() == majority
    merged = (deltas * keep).sum(0)
    if normalize:
        kept_w = (torch.tensor(w).reshape(-1, *[1] * base.dim()) * keep).sum(0)
        merged = merged / torch.where(kept_w == 0, 1.0, kept_w)
    return base + lam * merged


def test_ties_formula(models):
    base, xs = models
    dens = [0.3, 0.5, 0.7]
    assert_close(M.ties(base, xs, W, dens), plain_ties(base, xs, W, dens), **TIGHT)
    assert_close(
        M.ties(base, xs, W, dens, normalize=False, lambda_=1.3), plain_ties(base, xs, W, dens, False, 1.3), **TIGHT
    )


def test_ties_rescale_preserves_each_trimmed_task_vectors_l1_norm(models):
    base, (a, _, _) = models
    out = M.ties(base, [a], [1.0], [0.25], rescale=True)
    d = a - base
    kept = plain_topk(d, 0.25)
    assert_close(out - base, kept * (d.abs().sum() / kept.abs().sum()), rtol=1e-5, atol=1e-6)
    assert (out != base).sum() == int(0.25 * d.numel())


# ------------------------------------------------------------------------------------------------ dare


def test_dare_is_reproducible_with_a_seed(models):
    base, xs = models
    run = lambda seed, fn: fn(base, xs, W, [0.5] * 3, generator=torch.Generator().manual_seed(seed))
    for fn in (M.dare_linear, M.dare_ties, M.della, M.della_linear):
        assert torch.equal(run(7, fn), run(7, fn))
        assert not torch.equal(run(7, fn), run(8, fn))


def test_dare_keep_rate_and_rescale():
    base = torch.zeros(100_000)
    delta = 1.0 + 0.1 * rand(100_000, seed=3)
    g = lambda: torch.Generator().manual_seed(0)
    kept = M.dare_linear(base, [delta], [1.0], [0.3], generator=g(), rescale=False)
    rate = (kept != 0).float().mean().item()
    assert abs(rate - 0.3) < 0.02  # binomial std is 0.0014
    assert torch.equal(kept[kept != 0], delta[kept != 0])  # kept values unscaled without rescale
    rescaled = M.dare_linear(base, [delta], [1.0], [0.3], generator=g())
    assert torch.equal(rescaled != 0, kept != 0)  # same draws
    # mergekit's rescale matches L1 norms exactly (not the paper's 1 / density) ...
    assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    # ... which preserves the mean in expectation
    assert abs(rescaled.mean().item() - delta.mean().item()) < 0.01


def test_dare_formulas_with_the_same_random_stream(models):
    base, xs = models
    dens = [0.3, 1.0, 0.7]  # density 1 draws nothing
    g = torch.Generator().manual_seed(3)
    masks = [(plain_uniform(base.shape, g) < d).float() if d < 1 else torch.ones_like(base) for d in dens]
    masked = [base + (x - base) * m for x, m in zip(xs, masks)]
    out = M.dare_linear(base, xs, W, dens, generator=torch.Generator().manual_seed(3), rescale=False)
    assert_close(out, M.task_arithmetic(base, masked, W), **TIGHT)
    out = M.dare_ties(base, xs, W, dens, generator=torch.Generator().manual_seed(3), rescale=False)
    no_trim = lambda d, _density: d
    assert_close(out, plain_ties(base, masked, W, dens, normalize=False, trim=no_trim), **TIGHT)


# ----------------------------------------------------------------------------------------- breadcrumbs


def plain_breadcrumbs(d, density, gamma):
    n = d.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    ordered = d.abs().flatten().sort().values
    lo, hi = ordered[n_bot], ordered[n_bot + target - 1]
    return d * ((d.abs() >= lo) & (d.abs() <= hi))


def test_breadcrumbs_formula(models):
    base, xs = models
    gammas = [0.01, 0.05, 0.1]
    expected = base + sum(w * plain_breadcrumbs(x - base, 0.5, g) for w, x, g in zip(W, xs, gammas))
    assert_close(M.breadcrumbs(base, xs, W, [0.5] * 3, gammas=gammas), expected, **TIGHT)
    # default gamma 0.01 of 192 elements: int(1.92) = 1 outlier dropped
    d = xs[0] - base
    out = M.breadcrumbs(base, [xs[0]], [1.0], [0.5]) - base
    assert (out != 0).sum() == 96 and out.flatten()[d.abs().flatten().argmax()] == 0
    # gamma shrinks when density + gamma > 1: int(0.9 * 192) = 172 smallest kept, the top 20 dropped
    out = M.breadcrumbs(base, [xs[0]], [1.0], [0.9], gammas=[0.3]) - base
    assert_close(out, d * (d.abs() <= d.abs().flatten().sort().values[171]), **TIGHT)


def test_breadcrumbs_ties_formula(models):
    base, xs = models
    trim = lambda d, density: plain_breadcrumbs(d, density, 0.05)
    expected = plain_ties(base, xs, W, [0.5] * 3, normalize=False, trim=trim)
    assert_close(M.breadcrumbs_ties(base, xs, W, [0.5] * 3, gammas=[0.05] * 3), expected, **TIGHT)


# ----------------------------------------------------------------------------------------------- della


def test_della_formula_with_the_same_random_stream(models):
    base, xs = models
    density, eps = 0.5, 0.1
    g = torch.Generator().manual_seed(5)
    pruned = []
    for x in xs:
        d = x - base
        rank = d.abs().argsort(dim=1).argsort(dim=1).float()  # 0 = smallest in its row
        probs = density - eps + 2 * eps * rank / (d.shape[1] - 1)
        pruned.append(base + d * (plain_uniform(probs.shape, g) < probs).float())
    out = M.della(base, xs, W, [density] * 3, epsilons=[eps] * 3, generator=torch.Generator().manual_seed(5), rescale=False)
    assert_close(out, plain_ties(base, pruned, W, [1.0] * 3), **TIGHT)
    out = M.della_linear(base, xs, W, [density] * 3, epsilons=[eps] * 3, generator=torch.Generator().manual_seed(5), rescale=False)
    assert_close(out, M.task_arithmetic(base, pruned, W), **TIGHT)


def test_della_keeps_large_magnitudes_more_often():
    d = torch.arange(1.0, 101.0).repeat(2000, 1)  # every row ranks its columns the same way
    out = M.della_linear(torch.zeros_like(d), [d], [1.0], [0.5], epsilons=[0.2], generator=torch.Generator().manual_seed(0), rescale=False)
    rate = (out != 0).float().mean(dim=0)
    assert abs(rate[0].item() - 0.3) < 0.04 and abs(rate[-1].item() - 0.7) < 0.04


def test_della_epsilon_must_keep_probabilities_inside_0_1(models):
    base, xs = models
    with pytest.raises(ValueError, match="Epsilon"):
        M.della(base, xs, W, [0.9] * 3, generator=torch.Generator())  # 0.9 + 0.15 >= 1
    # density 1 (the default) returns early, before the epsilon check
    assert_close(M.della(base, xs, W, generator=torch.Generator()), plain_ties(base, xs, W, [1.0] * 3), **TIGHT)


# ----------------------------------------------------------------------------------------- model stock


def plain_model_stock(base, xs):
    offsets = [(x - base).double().flatten() for x in xs]
    cos = [torch.dot(p, q) / (p.norm() * q.norm()) for i, p in enumerate(offsets) for q in offsets[i + 1 :]]
    c = sum(cos) / len(cos)
    n = len(xs)
    t = n * c / (1 + (n - 1) * c)
    return (t * sum(x.double() for x in xs) / n + (1 - t) * base.double()).float()


def test_model_stock_formula(models):
    base, xs = models
    shared = rand(16, 12, seed=7)
    xs = [x + 0.2 * shared for x in xs]  # correlated task vectors, cos ~ 0.6
    assert_close(M.model_stock(base, xs), plain_model_stock(base, xs), rtol=1e-5, atol=1e-6)
    rows = torch.stack([plain_model_stock(base[i], [x[i] for x in xs]) for i in range(base.shape[0])])
    assert_close(M.model_stock(base, xs, filter_wise=True), rows, rtol=1e-5, atol=1e-6)


def test_model_stock_degenerate_cases(models):
    base, (a, _, _) = models
    # opposite task vectors: 1 + (N - 1) cos = 0, mergekit keeps the base
    assert torch.equal(M.model_stock(base, [a, 2 * base - a]), base)
    # identical fine-tunes: cos = 1, t = 1, the average
    assert_close(M.model_stock(base, [a, a.clone()]), a, **TIGHT)
    with pytest.raises(ValueError):
        M.model_stock(base, [a])


# ----------------------------------------------------------------------------------------------- specs


def test_specs_match_mergekit():
    """The registry holds mergekit 0.1.5's 19 merge methods with its parameter names, defaults and contracts."""
    assert set(METHODS) == {
        "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce", "nearswap",
        "arcee_fusion", "ram", "ramplus_tl",
    }
    gta = {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"}
    assert METHODS["ties"].parameters == gta and "t" not in METHODS["ties"].parameters
    assert METHODS["breadcrumbs"].parameters == METHODS["breadcrumbs_ties"].parameters == gta | {"gamma"}
    assert METHODS["della"].parameters == METHODS["della_linear"].parameters == gta | {"epsilon"}
    assert METHODS["slerp"].parameters == {"t"} and METHODS["slerp"].param("t").required
    assert METHODS["linear"].parameters == {"weight", "normalize"} and not METHODS["linear"].needs_base
    assert METHODS["nuslerp"].shared == {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert METHODS["model_stock"].shared == {"filter_wise": False} and METHODS["model_stock"].min_inputs == 3
    assert METHODS["sce"].shared == {"select_topk": 1.0, "int8_mask": False}
    assert METHODS["karcher"].shared == {"max_iter": 10, "tol": 1e-5} and METHODS["karcher"].base == "ignored"
    assert METHODS["multislerp"].shared == {"normalize_weights": True, "eps": 1e-8}
    assert METHODS["multislerp"].base == "optional" and METHODS["multislerp"].per_input == {"weight": None}
    assert METHODS["nearswap"].param("t").required and METHODS["nearswap"].max_inputs == 2
    assert METHODS["arcee_fusion"].params == () and METHODS["arcee_fusion"].max_inputs == 2
    assert METHODS["ram"].shared == {"epsilon": 1e-5}
    assert METHODS["ramplus_tl"].shared == {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    normalize = {n: s.shared["normalize"] for n, s in METHODS.items() if "normalize" in s.shared}
    assert [n for n, v in normalize.items() if v] == ["linear", "ties", "della"]
    rescale = {n for n, s in METHODS.items() if s.shared.get("rescale")}
    assert rescale == {"dare_ties", "dare_linear", "della", "della_linear"}
    assert {n for n, s in METHODS.items() if s.random} == rescale | {"arcee_fusion"}
    for spec in METHODS.values():
        assert spec.url.startswith("https://") and spec.title and spec.summary
    assert METHODS["ties"].per_input == {"weight": None, "density": 1.0}
    assert METHODS["breadcrumbs"].per_input["gamma"] == 0.01 and METHODS["della"].per_input["epsilon"] == 0.15


def test_apply_maps_names_fills_defaults_and_validates(models):
    base, xs = models
    ties = METHODS["ties"]
    out = ties.apply(xs, base=base, shared={"lambda": 0.5}, per_input={"weight": W, "density": [0.5] * 3})
    assert torch.equal(out, M.ties(base, xs, W, [0.5] * 3, lambda_=0.5))
    with pytest.raises(ValueError, match="no shared parameter"):
        ties.apply(xs, base=base, shared={"t": 0.5}, per_input={"weight": W})
    with pytest.raises(ValueError, match="requires"):
        ties.apply(xs, base=base)
    with pytest.raises(ValueError, match="torch.Generator"):
        METHODS["dare_ties"].apply(xs, base=base, per_input={"weight": W})
    assert torch.equal(METHODS["slerp"].apply([xs[0]], base=base, shared={"t": 0.3}), M.slerp(base, xs[0], 0.3))
    assert torch.equal(METHODS["linear"].apply(xs, per_input={"weight": W}), M.linear(xs, W))


def _stream(name: str, shared=None, per_input=None, shape=(4, 4)) -> str:
    """The streaming shape a method declares for one tensor's parameters ("whole": none)."""
    from types import SimpleNamespace

    from composer.methods import MergeJob

    m = METHODS[name]
    tensor = SimpleNamespace(shape=shape, numel=math.prod(shape), name="x", models=("a", "b", "c"))
    inputs = (1, 2) if m.base != "ignored" else (0, 1, 2)
    given = {k: (v,) * len(inputs) for k, v in m.per_input.items()} | dict(per_input or {})
    stream = MergeJob(tensor, m, {**m.shared, **(shared or {})}, given, None if m.base == "ignored" else 0,
                      inputs).stream
    return "whole" if stream is None else stream.name


def test_each_method_declares_its_streaming_shape():
    assert _stream("linear") == _stream("task_arithmetic") == _stream("nearswap") == _stream("ram") == "elementwise"
    assert _stream("slerp") == _stream("model_stock") == _stream("nuslerp") == "statistics"
    assert _stream("model_stock", {"filter_wise": True}) == "rows"
    assert _stream("model_stock", {"filter_wise": True}, shape=(2, 3, 4)) == "whole"
    assert _stream("nuslerp", {"nuslerp_flatten": False}) == "rows"
    assert _stream("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}) == "column statistics"
    assert _stream("ties", per_input={"density": (0.5, 1.0)}) == "ranked"
    assert _stream("ties") == "elementwise"  # density 1 trims nothing
    assert _stream("dare_ties", per_input={"density": (0.5, 0.5)}) == "random"
    assert _stream("della", per_input={"density": (0.5, 0.5)}) == "random"
    assert _stream("della", per_input={"density": (0.5, 0.5)}, shape=(2, 3, 4)) == "whole"
    assert _stream("sce") == _stream("ramplus_tl") == "statistics"
    assert _stream("sce", {"select_topk": 0.5}) == "ranked"  # the top-k variance cut first
    assert _stream("arcee_fusion") == _stream("arcee_fusion", shape=(2, 3, 4)) == "row statistics"
    # a Gram pass, then sum c_i x_i block by block (a tensor of one block: the formula on it, inside the same shape)
    assert _stream("karcher") == _stream("multislerp") == _stream("karcher", shape=(2, 3, 4)) == "statistics"
    assert _stream("multislerp", {"normalize_weights": False}, shape=(2, 3, 4)) == "statistics"


@pytest.mark.parametrize("gather", [0, 1 << 22], ids=["histograms", "gathered"])
@pytest.mark.parametrize("block", [7, 64, 1000])
@pytest.mark.parametrize(("density", "gamma", "rescale"), [
    (0.5, None, False), (0.3, None, True), (0.01, None, False), (0.0, None, False),
    (0.6, 0.1, False), (0.8, 0.05, True), (0.7, 0.5, False), (0.0, 0.1, True),
])
def test_streamed_ranking_equals_sorting_the_whole_tensor(monkeypatch, gather, block, density, gamma, rescale):
    """composer.ranked finds the kept elements in passes over blocks; with many exactly equal |values| (so every
    cut runs through a run of ties) it keeps the same elements, in the same tie order, as a stable sort: with the
    end bins' elements gathered, and with their histograms (end bins too full to gather)."""
    from composer import ranked

    monkeypatch.setattr(ranked, "BLOCK", block)
    monkeypatch.setattr(ranked, "GATHER", gather)
    monkeypatch.setattr(ranked, "PIECE", max(1, block // 3))  # blocks read in pieces
    g = torch.Generator().manual_seed(7)
    steps = torch.randint(-6, 7, (37, 29), generator=g).float() / 4
    nudged = steps.clone()  # bins holding equal exact values (lower 16 bits 0) and a few just above them
    nudged.view(-1)[::5] = torch.nextafter(nudged.view(-1)[::5], torch.tensor(float("inf")))
    nudged.view(-1)[1::7] += nudged.view(-1)[1::7].sign() * 2**-12
    deltas = [steps,  # 13 distinct values: ties everywhere
              torch.randn(37, 29, generator=g),
              torch.zeros(37, 29),
              nudged]
    n = deltas[0].numel()
    kept = sparsify.kept_range(n, density, gamma)
    keeps = ranked.select(lambda a, b: [d.reshape(-1)[a:b] for d in deltas], n, [kept] * 4, rescale)
    for d, keep in zip(deltas, keeps):
        expected = sparsify._keep_range(d, kept, rescale).reshape(-1)
        # apply works in place: on copies
        got = torch.cat([ranked.apply(keep, d.reshape(-1)[a:b].clone(), a) for a, b in ranked.blocks(0, n)])
        assert torch.equal(got, expected)
        if keep is not None:  # exactly the k elements of the range, ties included
            flat = d.reshape(-1).abs()
            assert sum(int(keep.mask(flat[a:b], a).sum()) for a, b in ranked.blocks(0, n)) == kept[1] - kept[0]


@pytest.mark.parametrize("block", [64, 1000])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, None), (0.3, None), (0.01, None), (0.6, 0.1), (0.7, 0.5)])
def test_streamed_ranking_of_bfloat16_inputs_equals_sorting_the_whole_tensor(monkeypatch, block, density, gamma):
    """The fused path: `raw` hands the mapped files' bfloat16 elements to the native kernels, which subtract and
    count in one pass and find where a cut run of equal values starts (composer.native.nth_equal_delta); the
    same kept elements as a stable sort of the float32 deltas."""
    from composer import native, ranked

    if native.library() is None:
        pytest.skip("no native kernels: no fused path")
    monkeypatch.setattr(ranked, "BLOCK", block)
    g = torch.Generator().manual_seed(8)
    base = (torch.randint(-6, 7, (41, 31), generator=g).float() / 8).to(torch.bfloat16)
    inputs = [(base.float() + torch.randint(-6, 7, (41, 31), generator=g).float() / 4).to(torch.bfloat16),
              (base.float() + torch.randn(41, 31, generator=g) * 0.1).to(torch.bfloat16)]
    deltas = [x.float() - base.float() for x in inputs]
    n = base.numel()
    kept = sparsify.kept_range(n, density, gamma)
    calls = []
    original = native.nth_equal_delta
    monkeypatch.setattr(native, "nth_equal_delta", lambda *a: calls.append(a) or original(*a))
    keeps = ranked.select(lambda a, b: [d.reshape(-1)[a:b] for d in deltas], n, [kept] * 2, False,
                          raw=lambda a, b: (base.reshape(-1)[a:b], [x.reshape(-1)[a:b] for x in inputs]))
    for d, keep in zip(deltas, keeps):
        expected = sparsify._keep_range(d, kept, False).reshape(-1)
        got = torch.cat([ranked.apply(keep, d.reshape(-1)[a:b].clone(), a) for a, b in ranked.blocks(0, n)])
        assert torch.equal(got, expected)
    if density == 0.5:  # the first vector's 13 values: its cut runs through a run of ties, found natively
        assert calls


def test_kept_range_keeps_mergekit_counts():
    assert sparsify.kept_range(100, 1.0) is None
    assert sparsify.kept_range(100, 0.25) == (0, 25)
    assert sparsify.kept_range(100, 0.001) == (0, 1)  # at least one element, as mergekit
    assert sparsify.kept_range(100, 0.0) == (0, 0)
    assert sparsify.kept_range(100, 0.5, 0.1) == (10, 60)  # drop the 10 largest, keep the next 50
    assert sparsify.kept_range(100, 0.95, 0.1) == (5, 100)  # the outlier cut shrinks to fit


def test_a_failed_streamed_pass_waits_for_its_other_blocks():
    """ranked.each runs on a pool that outlives the pass: when one block fails, the error reaches the caller
    (who then closes the sources) only after the other blocks have stopped; a block still reading an unmapped
    source crashed the process."""
    import time

    from composer import ranked

    started, finished = [], []

    def block(a, b):
        started.append(a)
        if a == 1:
            time.sleep(0.05)  # the other worker takes block 0 meanwhile
            raise RuntimeError("bad block")
        time.sleep(0.3)
        finished.append(a)
        return a

    for _ in range(3):
        started.clear(), finished.clear()
        with pytest.raises(RuntimeError, match="bad block"):
            list(ranked.each(block, [(0, 1), (1, 2), (2, 3), (3, 4)]))
        assert 0 in started and sorted(finished) == sorted(a for a in started if a != 1)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 12345])
def test_packed_masks_unpack_to_the_mask(n):
    """DARE, DELLA and SCE keep their masks packed 8 to a byte between passes: any range unpacks to the mask's."""
    from composer.methods.common import pack_mask, unpack_mask

    mask = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4).float()
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    for a, b in [(0, n), (3 % n, n), (0, max(0, n - 5)), (n // 3, 2 * n // 3)]:
        assert torch.equal(unpack_mask(packed, a, b), mask[a:b])
