"""composer.methods.geometric: karcher, multislerp and nearswap against their formulas written out plainly (float64,
explicit loops over the elements), plus the edge cases of mergekit 0.1.5's source."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from composer.methods.geometric import karcher, multislerp, nearswap

# The implementations compute in float32, the references below in float64 on the same (float32) inputs: results
# of order 1 differ by a few float32 ulps (1.2e-7 each), which TIGHT allows and nothing more.
TIGHT = dict(rtol=1e-6, atol=1e-6)
SHAPE = (4, 5)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def spread_inputs(n, spread=0.5, seed=10):
    """n tensors around one common tensor, at angles from a few degrees to tens of degrees apart."""
    centre = rand(*SHAPE, seed=1)
    return [centre + spread * rand(*SHAPE, seed=seed + i) for i in range(n)]


# float64 vector helpers on plain lists, so the references share no code with the implementation


def flat(x):
    return [float(v) for v in x.to(torch.float64).reshape(-1).tolist()]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def norm(u):
    return math.sqrt(dot(u, u))


def scaled(c, u):
    return [c * a for a in u]


def add(*vs):
    return [sum(parts) for parts in zip(*vs)]


def tensor(values, like):
    return torch.tensor(values, dtype=torch.float64).reshape(like.shape)


# ------------------------------------------------------------------------------------------------ karcher


def plain_karcher(xs, max_iter=10, tol=1e-5):
    """mergekit's Karcher iteration, in float64: weights 1/n, inputs with |x| <= tol left out of the direction."""
    vs = [flat(x) for x in xs]
    n = len(vs)
    norms = [norm(v) for v in vs]
    kept = [i for i in range(n) if norms[i] > tol]
    if not kept:
        return tensor([0.0] * len(vs[0]), xs[0])
    units = [scaled(1 / norms[i], vs[i]) for i in kept]
    weights = [1 / len(kept)] * len(kept)
    mean = add(*[scaled(w, u) for w, u in zip(weights, units)])
    mean = list(units[0]) if norm(mean) < tol else scaled(1 / norm(mean), mean)
    for _ in range(max_iter):
        tangent = [0.0] * len(mean)
        for w, u in zip(weights, units):
            c = max(-1.0, min(1.0, dot(mean, u)))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent = add(tangent, scaled(w * theta / math.sin(theta), add(u, scaled(-c, mean))))
        size = norm(tangent)
        if size < tol:
            break
        mean = add(scaled(math.cos(size), mean), scaled(math.sin(size) / size, tangent))
        if norm(mean) > tol:
            mean = scaled(1 / norm(mean), mean)
    return tensor(scaled(sum(norms) / n, mean), xs[0])


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher_matches_the_formula(n, max_iter):
    xs = spread_inputs(n)
    assert_close(karcher(None, xs, max_iter=max_iter), plain_karcher(xs, max_iter=max_iter).float(), **TIGHT)


def test_karcher_is_the_spherical_mean():
    """At the result's direction the weighted log maps of the inputs' directions sum to zero (the defining property
    of the Karcher mean), and its norm is the inputs' mean norm."""
    xs = spread_inputs(3, spread=1.0)
    out = karcher(None, xs, max_iter=100, tol=1e-7)
    m = flat(out)
    assert norm(m) == pytest.approx(sum(norm(flat(x)) for x in xs) / 3, rel=1e-6)
    m = scaled(1 / norm(m), m)
    gradient = [0.0] * len(m)
    for x in xs:
        u = scaled(1 / norm(flat(x)), flat(x))
        c = dot(m, u)
        theta = math.acos(max(-1.0, min(1.0, c)))
        gradient = add(gradient, scaled(theta / math.sin(theta) / 3, add(u, scaled(-c, m))))
    assert norm(gradient) < 1e-5
    # the first iterate (the normalised Euclidean mean of the directions) is not yet there
    assert not torch.allclose(karcher(None, xs, max_iter=0), out, rtol=1e-4, atol=1e-4)


def test_karcher_stops_early_once_converged():
    xs = spread_inputs(5, spread=2.0)  # converges (|tangent| < tol) in its 6th iteration
    ten = karcher(None, xs, max_iter=10)
    assert torch.equal(karcher(None, xs, max_iter=1000), ten)  # broke out of the loop before the 10th iteration
    assert torch.equal(karcher(None, xs, max_iter=6), ten)
    assert not torch.equal(karcher(None, xs, max_iter=5), ten)
    # a looser tol stops sooner
    assert torch.equal(karcher(None, xs, tol=1e-2), karcher(None, xs, max_iter=3, tol=1e-2))
    assert not torch.equal(karcher(None, xs, tol=1e-2), ten)
    # parallel inputs: every angle is below tol, the tangent is zero at once, and the result is the mean norm
    a = rand(*SHAPE, seed=2)
    assert_close(karcher(None, [a, 2 * a, 3 * a]), 2 * a, **TIGHT)


def test_karcher_of_one_tensor_returns_it():
    a = rand(*SHAPE, seed=2)
    assert torch.equal(karcher(None, [a]), a)
    assert karcher(None, [a.bfloat16()]).dtype == torch.float32
    assert torch.equal(karcher(None, [a], max_iter=0), a)


def test_karcher_arity_and_base():
    with pytest.raises(ValueError, match="at least one"):
        karcher(None, [])
    a = rand(*SHAPE, seed=2)
    with pytest.raises(ValueError, match="no base"):
        karcher(a, [a, a])
    with pytest.raises(ValueError, match="shapes differ"):
        karcher(None, [a, a[:-1]])


def test_karcher_zero_and_tiny_inputs():
    a = rand(*SHAPE, seed=2)
    zero = torch.zeros(SHAPE)
    tiny = 1e-7 * rand(*SHAPE, seed=3)  # norm below tol: left out of the direction, counted in the scale
    # a zero input keeps a's direction and halves the mean norm
    assert_close(karcher(None, [a, zero]), a / 2, **TIGHT)
    scale = (torch.linalg.vector_norm(a) + torch.linalg.vector_norm(tiny)) / 2
    assert_close(karcher(None, [a, tiny]), scale * a / torch.linalg.vector_norm(a), **TIGHT)
    # nothing above tol: zeros
    out = karcher(None, [tiny, zero])
    assert torch.equal(out, torch.zeros(SHAPE)) and out.dtype == torch.float32


def test_karcher_of_antipodal_inputs_is_finite_at_the_mean_norm():
    """a and -a: the Euclidean mean of the directions is zero, so the start is a's direction; there -a's log map
    is 0/0 (theta = pi), and float32 rounding of <u, u> (1 - 1.2e-7, not 1) gives a tangent of rounding noise
    scaled by theta / sin theta (~6e3) that moves the mean to an arbitrary direction, as in mergekit. The result is
    still finite, with the inputs' mean norm."""
    a = rand(*SHAPE, seed=2)
    out = karcher(None, [a, -a])
    assert torch.isfinite(out).all()
    assert_close(torch.linalg.vector_norm(out), torch.linalg.vector_norm(a), **TIGHT)


# --------------------------------------------------------------------------------------------- multislerp


def plain_multislerp(base, xs, weights, normalize_weights=True, eps=1e-8):
    """mergekit's multislerp, in float64: tangent space at the weighted mean of the unit vectors."""
    vs = [flat(x) for x in xs]
    if base is not None:
        b = flat(base)
        vs = [add(v, scaled(-1, b)) for v in vs]
    w = [float(torch.tensor(v, dtype=torch.float32)) for v in weights]  # mergekit's weights are float32
    if normalize_weights:
        w = [v / sum(w) for v in w]
    norms = [norm(v) for v in vs]
    units = [scaled(1 / (r + eps), v) for r, v in zip(norms, vs)]
    mean = add(*[scaled(wi, u) for wi, u in zip(w, units)])
    mean = scaled(1 / norm(mean), mean)
    tangent = add(*[scaled(wi, add(u, scaled(-dot(u, mean), mean))) for wi, u in zip(w, units)])
    size = norm(tangent) + eps
    result = add(scaled(math.cos(size), mean), scaled(math.sin(size) / size, tangent))
    result = scaled(sum(wi * r for wi, r in zip(w, norms)), result)
    if base is not None:
        result = add(result, b)
    return tensor(result, xs[0])


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("n", [2, 3])
def test_multislerp_matches_the_formula(with_base, normalize_weights, n):
    xs = spread_inputs(n)
    base = rand(*SHAPE, seed=1) if with_base else None
    weights = [0.3, 0.9, 0.5][:n]
    got = multislerp(base, xs, weights, normalize_weights=normalize_weights)
    assert_close(got, plain_multislerp(base, xs, weights, normalize_weights).float(), **TIGHT)


def test_multislerp_is_the_mean_direction_at_the_mean_norm():
    """The tangent space is taken at the weighted mean itself, so the tangent sum is zero but for rounding: the
    result is the normalised weighted mean of the unit vectors, scaled by the weighted mean of the norms."""
    xs = spread_inputs(3, spread=2.0)
    w = [0.2, 0.5, 0.3]
    units = [x / torch.linalg.vector_norm(x) for x in xs]
    mean = sum(wi * u for wi, u in zip(w, units))
    expected = mean / torch.linalg.vector_norm(mean) * sum(wi * torch.linalg.vector_norm(x) for wi, x in zip(w, xs))
    assert_close(multislerp(None, xs, w), expected, **TIGHT)


def test_multislerp_of_one_tensor_returns_it():
    a, base = rand(*SHAPE, seed=2), rand(*SHAPE, seed=3)
    assert torch.equal(multislerp(None, [a], [0.5]), a)
    assert torch.equal(multislerp(base, [a], [0.0]), a)  # base and weight unused, as in mergekit


def test_multislerp_antipodal_pair_falls_back_to_linear():
    # dyadic values, so that base + a - base == a exactly and the unit vectors cancel exactly
    a, base = torch.round(rand(*SHAPE, seed=2) * 64) / 64, torch.round(rand(*SHAPE, seed=3) * 8) / 8
    # equal weights: the unit vectors cancel, and the result is w0 v0 + w1 v1
    assert_close(multislerp(None, [a, -2 * a], [1.0, 1.0]), -0.5 * a, **TIGHT)
    assert_close(multislerp(None, [a, -2 * a], [2.0, 2.0], normalize_weights=False), -2 * a, **TIGHT)
    assert_close(multislerp(base, [base + a, base - 2 * a], [1.0, 1.0]), base - 0.5 * a, **TIGHT)
    # unequal weights do not cancel: the heavier direction at the weighted mean norm
    assert_close(multislerp(None, [a, -a], [1.0, 3.0]), -a, **TIGHT)


def test_multislerp_more_than_two_that_cancel_is_an_error():
    a, b = rand(*SHAPE, seed=2), rand(*SHAPE, seed=3)
    with pytest.raises(ValueError, match="weighted sum"):
        multislerp(None, [a, -a, b, -b], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weighted sum"):
        multislerp(None, [a, -a, torch.zeros(SHAPE)], [1.0, 1.0, 1.0])  # a zero input's unit vector is zero


def test_multislerp_weights_and_arity():
    a, b = rand(*SHAPE, seed=2), rand(*SHAPE, seed=3)
    with pytest.raises(ValueError, match="sum to zero"):
        multislerp(None, [a, b], [1.0, -1.0])
    assert torch.isfinite(multislerp(None, [a, b], [1.0, -1.0], normalize_weights=False)).all()
    with pytest.raises(ValueError, match="weight: expected 2"):
        multislerp(None, [a, b], [1.0])
    with pytest.raises(ValueError, match="at least one non-base"):
        multislerp(a, [], [])
    with pytest.raises(ValueError, match="shapes differ"):
        multislerp(a[:-1], [a, b], [1.0, 1.0])


# ----------------------------------------------------------------------------------------------- nearswap


def plain_nearswap(base, other, t):
    out = []
    for a, b in zip(flat(base), flat(other)):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        out.append(w * b + (1 - w) * a)
    return tensor(out, base)


@pytest.mark.parametrize("t", [1e-4, 0.01, 0.3, 1.0])
def test_nearswap_matches_the_formula(t):
    base = rand(*SHAPE, seed=1)
    other = base + 0.5 * rand(*SHAPE, seed=2)
    assert_close(nearswap(base, [other], t=t), plain_nearswap(base, other, t).float(), **TIGHT)


def test_nearswap_moves_at_most_t_and_swaps_near_values():
    base = rand(8, 8, seed=1)
    other = base + 0.1 * rand(8, 8, seed=2)
    t = 0.05
    out = nearswap(base, [other], t=t)
    near = (base - other).abs() <= t
    assert near.any() and (~near).any()
    assert_close(out[near], other[near], **TIGHT)
    assert_close((out - base).abs()[~near], torch.full(((~near).sum().item(),), t), **TIGHT)


def test_nearswap_endpoints():
    base = rand(*SHAPE, seed=1)
    other = base + rand(*SHAPE, seed=2)
    assert torch.equal(nearswap(base, [other], t=0.0), base)
    assert torch.equal(nearswap(base, [other], t=-1.0), base)  # weight clamped at 0
    assert torch.equal(nearswap(base, [other], t=1e3), other)  # weight clamped at 1


def test_nearswap_clamps_the_distance_at_1e_6():
    """Below 1e-6 apart, the weight is t / 1e-6, not t / |a - b|."""
    base = torch.zeros(SHAPE)
    other = 1e-7 * (1 + torch.rand(SHAPE, generator=torch.Generator().manual_seed(4)))  # 1e-7 .. 2e-7 apart
    out = nearswap(base, [other], t=2.5e-7)  # unclamped, every weight would be >= 1
    assert_close(out, 0.25 * other, rtol=1e-6, atol=0)
    assert torch.equal(nearswap(base, [other], t=1e-6), other)


def test_nearswap_is_elementwise():
    base = rand(32, 8, seed=1)
    other = base + 0.1 * rand(32, 8, seed=2)
    whole = nearswap(base, [other], t=0.02)
    blocks = torch.cat([nearswap(base[i : i + 5], [other[i : i + 5]], t=0.02) for i in range(0, 32, 5)])
    assert torch.equal(blocks, whole)


def test_nearswap_arity():
    a, b = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    with pytest.raises(ValueError, match="needs a base"):
        nearswap(None, [a], t=0.1)
    for others in ([], [a, b]):
        with pytest.raises(ValueError, match="exactly one other"):
            nearswap(a, others, t=0.1)


def test_computed_in_float32_from_bf16_inputs():
    xs = [x.bfloat16() for x in spread_inputs(3)]
    up = [x.float() for x in xs]
    assert torch.equal(karcher(None, xs), karcher(None, up))
    assert torch.equal(multislerp(xs[0], xs[1:], [0.4, 0.6]), multislerp(up[0], up[1:], [0.4, 0.6]))
    assert torch.equal(nearswap(xs[0], [xs[1]], t=0.1), nearswap(up[0], [up[1]], t=0.1))
    assert karcher(None, xs).dtype == multislerp(None, xs, [1, 1, 1]).dtype == torch.float32


# ------------------------------------------------------------------------- streamed karcher and multislerp
#
# Streamed, both methods take the Gram matrix of their vectors in one float64 pass over blocks, work out their
# coefficients from it, and blend sum c_i (x_i - base) (+ base) block by block (composer.methods.geometric). The
# tests below run that path as the engine does (prepare once, then blend chunk by chunk) on tensors of several
# blocks, with a last block and chunks cut short, and compare it with exact float64 results and with the
# whole-tensor formula.

U = 2.0**-24  # float32's unit roundoff


def _tensor_job(method, xs, base=None, shared=None, weights=None, block=1000, chunk=333):
    """The engine's MergeJob for one tensor merged from in-memory float32 tensors (the base, where there is one,
    first), with the given statistics step (`block`) and blend step (`chunk`)."""
    from composer.methods import METHODS, MergeJob
    from composer.sources import TensorInfo
    from composer.tensorplan import TensorPlan

    arrays = ([] if base is None else [base]) + list(xs)
    flat = {f"x{i}": x.reshape(-1) for i, x in enumerate(arrays)}
    infos = tuple(TensorInfo(f"x{i}", "F32", tuple(x.shape), None, 0) for i, x in enumerate(arrays))
    per_input = [()] * (base is not None) + [(("weight", w),) for w in (weights or [1.0] * len(xs))]
    plan = TensorPlan("x", method, infos, tuple(f"m{i}" for i in range(len(arrays))), "F32",
                      params=tuple((shared or {}).items()), input_params=tuple(per_input),
                      base=None if base is None else 0)
    sources = type("Sources", (), {"tensor": lambda self, info, a, b, staged=False: flat[info.name][a:b]})()
    return MergeJob.of(plan, METHODS[method], sources=sources, chunk=chunk, block=block)


def streamed(job):
    """(the result, the statistics): prepare once, then blend every chunk, as composer.merging does."""
    stream = job.stream
    assert stream.name == "statistics"
    stats = stream.prepare(job)
    steps = range(0, job.numel, job.chunk)
    out = torch.cat([stream.blend(job, stats, a, min(job.numel, a + job.chunk)).clone() for a in steps])
    return out.reshape(job.shape), stats


def blend_scale(job, stats):
    """S, elementwise: the size of what the blend adds up, sum |c_i (x_i - base)| + |base|."""
    base = job.read_base()
    total = torch.zeros(job.numel, dtype=torch.float64) if base is None else base.double().abs()
    for k, c in stats.terms:
        total += (c.double() * (job.read(k).double() - (0 if base is None else base.double()))).abs()
    return total.reshape(job.shape)


def exact_karcher(xs, max_iter=10, tol=1e-5):
    """plain_karcher on whole float64 vectors (for long ones): (the result, how many times the mean moved)."""
    vs = [x.double().reshape(-1) for x in xs]
    norms = [v.norm() for v in vs]
    units = [v / r for v, r in zip(vs, norms)]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    moves = 0
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            c = (mean @ u).clamp(-1, 1)
            theta = torch.acos(c)
            tangent += theta / torch.sin(theta) / len(units) * (u - c * mean)
        size = tangent.norm()
        if size < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) / size * tangent
        mean, moves = mean / mean.norm(), moves + 1
    return (sum(norms) / len(vs) * mean).reshape(xs[0].shape), moves


def exact_multislerp(base, xs, weights, normalize_weights=True, eps=1e-8):
    """plain_multislerp on whole float64 vectors, its tangent sum (zero) left out."""
    b = None if base is None else base.double().reshape(-1)
    vs = [x.double().reshape(-1) - (0 if b is None else b) for x in xs]
    w = torch.tensor(weights, dtype=torch.float32)
    w = (w / w.sum() if normalize_weights else w).double()
    norms = [v.norm() for v in vs]
    mean = sum(wi * v / (r + eps) for wi, v, r in zip(w, vs, norms))
    out = mean / mean.norm() * math.cos(eps) * sum(wi * r for wi, r in zip(w, norms))
    return (out if b is None else out + b).reshape(xs[0].shape)


def reduction_error(vectors):
    """How far torch's float32 whole-tensor reductions, as the formulas take them, are from exact on these vectors:
    the largest relative error of vector_norm (of each vector, and of the mean of their units) and absolute error
    of the dot product of two units (a cosine)."""
    errors = [abs(torch.linalg.vector_norm(v).double() / v.double().norm() - 1) for v in vectors]
    units = [(v / torch.linalg.vector_norm(v)).reshape(-1) for v in vectors]
    errors += [abs(torch.dot(a, b).double() - a.double() @ b.double()) for a in units for b in units]
    mean = sum(units) / len(units)
    errors.append(abs(torch.linalg.vector_norm(mean).double() / mean.double().norm() - 1))
    return float(max(errors))


def long_inputs(n, numel, spread, seed=10):
    centre = rand(numel, seed=1)
    return [centre + spread * rand(numel, seed=seed + i) for i in range(n)]


# Streamed against exact. Each coefficient c_i is exact but for its one rounding to float32 (G is float64 sums of
# exact products: relative error ~1e-16), and the blend rounds each (x_i - base), each product, each of the n - 1
# sums and the base's addition once: |streamed - exact| <= (n + 3) U S elementwise. (Observed: at most 3.0.)
#
# Streamed against the formula: the formula also rounds elementwise, and its whole-tensor float32 reductions (torch's
# vector_norm, dot, sum over N elements) err by up to delta (relative; measured per case with reduction_error:
# ~1e-7 at N = 1e4, ~3e-6 at N = 3e5, 6e-3 on a 32000x2048 embedding), where the streamed sums are exact to 1e-16.
# To first order:
# - multislerp: 2n + 6 roundings of S (units, weights, the n - 1 sums, / |m|, * sum w_i |v_i|, + base, and its
#   tangent sum, rounding noise of the units' size, of as many more), times |m| <= sum w_i where the weights are not
#   normalised; each |v_i| enters twice (the units and sum w_i |v_i|), |m| once and the dots of the tangent once:
#   5 delta S.
# - karcher: 3n + 3 roundings for the norms, the units and the first mean; 4n + 5 per move of the mean (each term
#   of the tangent: dot * m, u - it, * its factor, the sum; then the update's three products, its sum and the
#   renormalisation); the norms' delta in the scale, the final |m|'s, and per move the dots' and |tangent|'s:
#   (2 + 2 K) delta S for K moves.
# (Observed: at most 0.27 of these bounds; roundings seldom all go one way, and karcher's iteration contracts, so
# the errors of its early moves shrink. At N = 2**18 the formula is 48 U S from exact, the streamed result 2.6.)
def multislerp_bound(n, weight_sum, delta):
    return (n + 3 + (2 * n + 6) * max(1.0, weight_sum)) * U + 5 * delta


def karcher_bound(n, moves, delta):
    return (n + 3 + 3 * n + 3 + moves * (4 * n + 5)) * U + (2 + 2 * moves) * delta


KARCHER_CASES = [  # (inputs, numel, spread, max_iter, tol)
    (2, 7123, 1.0, 10, 1e-5), (3, 7123, 0.5, 10, 1e-5), (5, 7123, 2.0, 10, 1e-5), (5, 7123, 2.0, 3, 1e-5),
    (3, 7123, 2.0, 0, 1e-5), (4, 7123, 3.0, 10, 1e-7), (3, 2**18 + 77, 2.0, 10, 1e-5),
]


@pytest.mark.parametrize(("n", "numel", "spread", "max_iter", "tol"), KARCHER_CASES)
def test_streamed_karcher_is_exact_within_the_blend_roundings(n, numel, spread, max_iter, tol):
    xs = long_inputs(n, numel, spread)
    block = 1000 if numel < 10**4 else 2**15
    job = _tensor_job("karcher", xs, shared={"max_iter": max_iter, "tol": tol}, block=block, chunk=block // 3 + 7)
    assert len(job.steps()) > 4
    got, stats = streamed(job)
    scale = blend_scale(job, stats)
    expected, moves = exact_karcher(xs, max_iter, tol)
    assert ((got.double() - expected).abs() <= (n + 3) * U * scale).all()
    formula = karcher(None, xs, max_iter=max_iter, tol=tol)
    allowed = karcher_bound(n, moves, reduction_error(xs)) * scale
    assert ((got - formula).double().abs() <= allowed).all(), ((got - formula).abs() / allowed).max()


MULTISLERP_CASES = [  # (inputs, numel, with a base, normalize_weights)
    (2, 7123, False, True), (3, 7123, False, True), (3, 7123, True, True), (3, 7123, True, False),
    (5, 7123, False, False), (5, 7123, True, True), (3, 2**18 + 77, False, True), (3, 2**18 + 77, True, False),
]


@pytest.mark.parametrize(("n", "numel", "with_base", "normalize_weights"), MULTISLERP_CASES)
def test_streamed_multislerp_is_exact_within_the_blend_roundings(n, numel, with_base, normalize_weights):
    xs = long_inputs(n, numel, 1.0)
    base = rand(numel, seed=1) if with_base else None
    weights = [0.5, 0.3, 0.2, 0.9, 0.4][:n]
    block = 1000 if numel < 10**4 else 2**15
    job = _tensor_job("multislerp", xs, base, {"normalize_weights": normalize_weights}, weights, block,
                      block // 3 + 7)
    got, stats = streamed(job)
    scale = blend_scale(job, stats)
    expected = exact_multislerp(base, xs, weights, normalize_weights)
    assert ((got.double() - expected).abs() <= (n + 3) * U * scale).all()
    formula = multislerp(base, xs, weights, normalize_weights=normalize_weights)
    vectors = xs if base is None else [x - base for x in xs]
    allowed = multislerp_bound(n, 1.0 if normalize_weights else sum(weights), reduction_error(vectors)) * scale
    assert ((got - formula).double().abs() <= allowed).all(), ((got - formula).abs() / allowed).max()


@pytest.mark.parametrize("method", ["karcher", "multislerp", "multislerp-base"])
def test_a_tensor_of_one_block_is_the_formula_bit_for_bit(method):
    """Up to one statistics step the prepare pass runs the formula (mergekit's float32 arithmetic) on the whole
    tensor; one element more and it streams."""
    xs = long_inputs(3, 1000, 1.0)
    base = rand(1000, seed=1) if method == "multislerp-base" else None
    name, weights = method.split("-")[0], [0.5, 0.3, 0.2]
    formula = (karcher(None, xs) if name == "karcher" else multislerp(base, xs, weights))
    got, stats = streamed(_tensor_job(name, xs, base, weights=weights, block=1000))
    assert stats.whole is not None and torch.equal(got, formula)
    got, stats = streamed(_tensor_job(name, xs, base, weights=weights, block=999))
    assert stats.whole is None and stats.terms and not torch.equal(got, formula)
    assert_close(got, formula, rtol=1e-5, atol=1e-6)


def test_streamed_karcher_edge_cases():
    a = rand(3000, seed=2)
    zero, tiny = torch.zeros(3000), 1e-7 * rand(3000, seed=3)

    def run(xs, **shared):
        return streamed(_tensor_job("karcher", xs, shared=shared))[0]

    assert torch.equal(run([a]), a)  # one input: returned as it is
    assert_close(run([a, zero]), a / 2, **TIGHT)  # a zero input keeps a's direction, halves the mean norm
    scale = (torch.linalg.vector_norm(a) + torch.linalg.vector_norm(tiny)) / 2
    assert_close(run([a, tiny]), scale * a / torch.linalg.vector_norm(a), **TIGHT)  # tiny: out of the direction
    assert torch.equal(run([tiny, zero]), torch.zeros(3000))  # nothing above tol: zeros
    assert_close(run([a, 2 * a, 3 * a]), 2 * a, **TIGHT)  # parallel: every angle below tol, at once
    out = run([a, -a])  # antipodal: the start is a's direction, and -a's log map is 0/0; finite, at the mean norm
    assert torch.isfinite(out).all()
    assert_close(torch.linalg.vector_norm(out), torch.linalg.vector_norm(a), **TIGHT)
    xs = long_inputs(5, 3000, 2.0)  # converges (|tangent| < tol) after a few moves: more iterations change nothing
    assert torch.equal(run(xs, max_iter=1000), run(xs, max_iter=10))
    assert not torch.equal(run(xs, max_iter=1), run(xs, max_iter=10))


def test_streamed_multislerp_edge_cases():
    a, base = torch.round(rand(3000, seed=2) * 64) / 64, torch.round(rand(3000, seed=3) * 8) / 8  # dyadic
    b = rand(3000, seed=4)

    def run(xs, weights, base=None, **shared):
        return streamed(_tensor_job("multislerp", xs, base, shared, weights))[0]

    assert torch.equal(run([a], [0.5]), a)
    assert torch.equal(run([a], [0.0], base), a)  # one input: returned as it is, base and weight unused
    # the unit vectors cancel exactly: the formula's fallback, w0 v0 + w1 v1 (+ base)
    assert_close(run([a, -2 * a], [1.0, 1.0]), -0.5 * a, **TIGHT)
    assert_close(run([a, -2 * a], [2.0, 2.0], normalize_weights=False), -2 * a, **TIGHT)
    assert_close(run([base + a, base - 2 * a], [1.0, 1.0], base), base - 0.5 * a, **TIGHT)
    assert_close(run([a, -a], [1.0, 3.0]), -a, **TIGHT)  # unequal weights do not cancel
    with pytest.raises(ValueError, match="weighted sum"):
        run([a, -a, b, -b], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        run([a, b], [1.0, -1.0])
    assert torch.isfinite(run([a, b], [1.0, -1.0], normalize_weights=False)).all()


@pytest.mark.parametrize("method", ["karcher", "multislerp"])
def test_the_engine_streams_them_as_the_job_does(models, write_recipe, tmp_path, monkeypatch, method):
    """Through the CLI, with statistics steps of 3000 elements and blend chunks of 1000 (the tiny models' tensors
    span up to 6 steps): every tensor is the in-memory job's result bit for bit (the same float64 sums, in the
    same steps, then elementwise arithmetic), and within the formula's bound."""
    import sys

    from click.testing import CliRunner

    from composer import plan_recipe, ranked
    from composer.cli import main
    from composer.tensorplan import merge_mode
    from tinymodels import load_state_dict

    names = ["llama", "llama-b", "llama-c"]
    weights = [0.5, 0.3, 0.2]
    head = f"base_model: {models['llama']}\n" if method == "multislerp" else ""
    entries = ", ".join(f"{{model: {models[m]}" + (f", parameters: {{weight: {w}}}}}" if method == "multislerp"
                                                    and m != "llama" else "}") for m, w in zip(names, weights))
    recipe = write_recipe(f"merge_method: {method}\ndtype: float32\n{head}models: [{entries}]\n")
    assert {merge_mode(t) for t in plan_recipe(recipe).tensors} == {"statistics"}
    monkeypatch.setattr(ranked, "BLOCK", 3000)
    monkeypatch.setattr(sys.modules["composer.merging"], "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(sys.modules["composer.execute"], "CHUNK_BYTES", 3 * 4096)
    result = CliRunner().invoke(main, [str(recipe), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out = load_state_dict(tmp_path / "out")
    inputs = [load_state_dict(models[m]) for m in names]
    streamed_tensors = 0
    for name, value in out.items():
        xs = [sd[name] for sd in inputs]
        if method == "karcher":
            job = _tensor_job("karcher", xs, block=3000, chunk=1000)
        else:
            job = _tensor_job("multislerp", xs[1:], xs[0], weights=weights[1:], block=3000, chunk=1000)
        expected, stats = streamed(job)
        assert torch.equal(value, expected), name
        streamed_tensors += stats.whole is None
    assert streamed_tensors >= 10


def test_streamed_results_do_not_depend_on_the_thread_count():
    """gram_sums sums each run of products on one thread (bmm over runs), the runs and blocks in order."""
    xs = long_inputs(3, 2**17 + 77, 2.0)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append([streamed(_tensor_job("karcher", xs, block=2**15, chunk=5000))[0],
                            streamed(_tensor_job("multislerp", xs[1:], xs[0], weights=[0.3, 0.7], block=2**15,
                                                 chunk=5000))[0]])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
