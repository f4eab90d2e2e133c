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
