"""The native kernels (composer.native) give the torch path's bits: the fused ranked blend against
_task_arithmetic with ranked.apply, pass 1's histogram against torch.bincount of the same keys, on values that
include NaN, +-inf and signed zeros; and a run with COMPOSER_NATIVE=0 writes the same model as one with them."""
from __future__ import annotations

import os
import shutil
import struct

import pytest
import torch

from composer import native, ranked
from composer.methods.taskvectors import _task_arithmetic

pytestmark = pytest.mark.skipif(native.library() is None and shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="no C compiler: composer runs the torch path")


def test_the_kernels_build_wherever_there_is_a_compiler():
    """A kernel source that does not compile would otherwise only make composer slower, silently."""
    assert native.library() is not None


def _bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _end(value: float, kept: bool, top: bool = False) -> ranked._End:
    """An end of a kept range whose equal elements are all kept (or none, through an empty rank range)."""
    return ranked._End(_bits(value), (0, 1) if kept else (0, 0), 1, top=top)


def _hostile(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.02
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e-38, 3e38])
    at = torch.randint(0, n, (n // 20,), generator=g)
    x[at] = specials[torch.randint(0, len(specials), (len(at),), generator=g)]
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, any NaN equal to any NaN (the kernel and torch may propagate different NaN payloads)."""
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32)))


def _keep(shape: int, lo: float) -> ranked.Keep | None:
    """Every kind of mask the kernel takes: a lower end only (the top kept), kept at it or not; both ends, each
    kept at or not; everything kept (None); nothing kept."""
    if shape < 2:
        return ranked.Keep(_end(lo, shape == 0), _end(3e38, True, top=True))
    if shape < 6:
        return ranked.Keep(_end(lo, shape in (2, 3)), _end(lo + 0.003, shape in (2, 4)))
    return None if shape == 6 else ranked.Keep(None, None)


def _drawn(d: torch.Tensor, mask: torch.Tensor, factor) -> torch.Tensor:
    """DARE's and DELLA's sparsification in the blend (composer.methods.dare._random_blend): a mask drawn before."""
    d.mul_(mask)
    return d if factor is None else d.mul_(factor)


@pytest.mark.parametrize("shift", range(10))
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_blend_is_the_torch_chain_bit_for_bit(n, consensus, normalize, shift):
    size = 20_000 + 7  # an odd length: the vector loops' tails
    base = _hostile(size, 0)
    xs = [base + torch.randn(size, generator=torch.Generator().manual_seed(i + 1)) * 0.002 for i in range(n)]
    for i, x in enumerate(xs):
        x[i::97] = _hostile(len(x[i::97]), 100 + i)
    g = torch.Generator().manual_seed(n)
    if shift >= 8:  # masks drawn beforehand, as DARE's: 0s and 1s, with a rescale factor on some
        masks = [(torch.rand(size, generator=g) < 0.5).float() for _ in range(n)]
        factors = [torch.tensor(1.7 + i, dtype=torch.float32) if i % 2 else None for i in range(n)]
        sparsify, steps = (lambda i, d: _drawn(d, masks[i], factors[i])), masks
        if shift == 9:  # kept packed, from an odd bit on (as the blend's steps inside a grid block)
            from composer.methods.common import pack_mask

            steps = [native.Packed(pack_mask(torch.cat([torch.ones(3 + i), m])), 3 + i) for i, m in enumerate(masks)]
    else:
        keeps = [_keep((shift + 3 * i) % 8, float(torch.rand((), generator=g)) * 0.002) for i in range(n)]
        for i, keep in enumerate(keeps):
            if keep is not None and keep.lo is not None and (i + shift) % 3 == 0:
                keep.factor = torch.tensor(1.7 + i, dtype=torch.float32)
        factors = [None if k is None else k.factor for k in keeps]
        sparsify = lambda i, d: ranked.apply(keeps[i], d, 0)  # noqa: E731
        steps = [None if k is None else k.steps(0, size) for k in keeps]
        assert all(s is not None for s, k in zip(steps, keeps) if k is not None)
    weights = [0.0 if shift == 7 and i == 0 else 0.3 + 0.25 * i for i in range(n)]  # a 0 weight: divisors of 0
    for lambda_ in (1.0, 0.3):
        want = _task_arithmetic(base, [x.clone() for x in xs], weights, sparsify, consensus=consensus,
                                normalize=normalize, int8_mask=False, lambda_=lambda_)
        w = torch.tensor(weights, dtype=torch.float32)
        total = w.reshape(-1, 1).sum(dim=0)  # as _task_arithmetic sums its (n, 1) weights
        divisor = 1.0 if float(total.abs()) < 1e-8 else float(total)
        got = native.ties_blend(base, xs, steps, [None if f is None else float(f) for f in factors], w,
                                consensus=consensus, normalize=normalize, divisor=divisor, lambda_=lambda_)
        assert got is not None
        assert _same(got, want), (n, consensus, normalize, lambda_)


def test_pass_one_histogram_is_torch_bincount_of_the_keys():
    deltas = _hostile(300_001, 7)
    deltas[::5] = -deltas[::5]
    bits = deltas.abs().view(torch.int32)
    want = torch.bincount((-bits).bitwise_right_shift_(16).neg_().add_(bits >> 16), minlength=1 << 16)
    got = torch.zeros(1 << 16, dtype=torch.int64)
    assert native.hist16(deltas, got)
    assert torch.equal(got, want)
    assert native.hist16(deltas, got) and torch.equal(got, 2 * want)  # it adds
    base = _hostile(300_001, 8)
    x = base + deltas  # some NaN and inf: their differences too
    bits = (x - base).abs().view(torch.int32)
    want = torch.bincount((-bits).bitwise_right_shift_(16).neg_().add_(bits >> 16), minlength=1 << 16)
    got = torch.zeros(1 << 16, dtype=torch.int64)
    assert native.hist16_delta(x, base, got) and torch.equal(got, want)
    # bfloat16 inputs (converted inside the loop when both are), alone or with a float32 one; with one of each,
    # torch and the kernel may propagate different NaN payloads (NaN - NaN), which land in other NaN bins
    nan_bins = (0x7F80 << 1) + 1  # the keys above +inf's
    for xb, bb in [(x.bfloat16(), base.bfloat16()), (x.bfloat16(), base), (x, base.bfloat16())]:
        bits = (xb.float() - bb.float()).abs().view(torch.int32)
        want = torch.bincount((-bits).bitwise_right_shift_(16).neg_().add_(bits >> 16), minlength=1 << 16)
        got = torch.zeros(1 << 16, dtype=torch.int64)
        assert native.hist16_delta(xb, bb, got), (xb.dtype, bb.dtype)
        if xb.dtype == bb.dtype:
            assert torch.equal(got, want)
        else:
            assert torch.equal(got[:nan_bins], want[:nan_bins]) and int(got.sum()) == int(want.sum())


def test_pass_one_histogram_adds_up_past_its_uint32_span():
    """The kernels count in uint32 bins, added to the int64 ones every 2**24 elements: one bin that holds more
    than that (and a second call adding to it) still counts every element."""
    n = (1 << 24) + 3001
    deltas = torch.full((n,), 0.5)
    deltas[-7:] = 2.0
    got = torch.zeros(1 << 16, dtype=torch.int64)
    assert native.hist16(deltas, got) and native.hist16(deltas[:5], got)
    key = lambda v: int(torch.tensor([v]).view(torch.int32)) >> 16 << 1
    assert int(got[key(0.5)]) == n - 7 + 5 and int(got[key(2.0)]) == 7 and int(got.sum()) == n + 5
    got.zero_()
    base = torch.zeros(n, dtype=torch.bfloat16)
    assert native.hist16_delta(deltas.bfloat16(), base, got)
    assert int(got[key(0.5)]) == n - 7 and int(got[key(2.0)]) == 7 and int(got.sum()) == n


def test_non_contiguous_or_non_float32_inputs_take_the_torch_path():
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    assert not native.hist16(torch.randn(100)[::2], hist)
    assert not native.hist16(torch.randn(100, dtype=torch.float64), hist)
    assert native.ties_blend(torch.randn(10), [torch.randn(20)[::2]], [None], [None], torch.ones(1),
                             consensus=True, normalize=True, divisor=1.0, lambda_=1.0) is None
    five = [torch.randn(10) for _ in range(native.MAX_INPUTS + 1)]  # torch sums 5+ vectors in another order
    assert native.ties_blend(torch.randn(10), five, [None] * len(five), [None] * len(five),
                             torch.ones(len(five)), consensus=False, normalize=False, divisor=1.0,
                             lambda_=1.0) is None


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("COMPOSER_NATIVE", "0")
    native.reset()
    try:
        assert native.library() is None
        assert not native.hist16(torch.randn(10), torch.zeros(1 << 16, dtype=torch.int64))
    finally:
        monkeypatch.delenv("COMPOSER_NATIVE")
        native.reset()
    assert native.library() is not None


def test_a_broken_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # exists, fails every build
    native.reset()
    try:
        assert native.library() is None
    finally:
        monkeypatch.delenv("CC")
        native.reset()


def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path))
    native.reset()
    try:
        assert native.library() is not None
        built = list((tmp_path / "native").glob("kernels-*.so"))
        assert len(built) == 1
        assert [p.name for p in (tmp_path / "native").iterdir()] == [built[0].name]  # no temporaries left
        stamp = built[0].stat().st_mtime_ns
        native.reset()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native.reset()


@pytest.fixture(scope="module")
def all_models(models, tmp_path_factory):
    """The test models, plus bfloat16 copies of the three llamas ("-bf16"): bfloat16 files merged with `dtype:
    bfloat16` reach the kernels as the files' own elements (MergeJob.read_raw)."""
    import shutil

    from safetensors.torch import load_file, save_file

    made = dict(models)
    root = tmp_path_factory.mktemp("bf16")
    for name in ("llama", "llama-b", "llama-c"):
        dest = root / name
        shutil.copytree(models[name], dest)
        for shard in dest.glob("*.safetensors"):
            save_file({k: v.bfloat16() for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
        made[name + "-bf16"] = dest
    return made


def _without_native(fn):
    """fn() on the torch path."""
    import os

    old = os.environ.get("COMPOSER_NATIVE")
    os.environ["COMPOSER_NATIVE"] = "0"
    native.reset()
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["COMPOSER_NATIVE"]
        else:
            os.environ["COMPOSER_NATIVE"] = old
        native.reset()


@pytest.mark.parametrize("n", [1, 7, 1000, 65_537])
def test_bernoulli_masks_are_the_torch_paths(n):
    """DARE's masks (a number p) and DELLA's (a probability per element), into a buffer or not, odd or even."""
    from composer.methods import sparsify

    probabilities = (0.5, 0.3, 1e-7, torch.rand(n, generator=torch.Generator().manual_seed(n)))

    def draw():
        out = []
        for p in probabilities:
            out.append(sparsify.bernoulli(p, (n,), torch.Generator().manual_seed(n)))
            buffer = torch.full((n + 3,), 7.0)
            out.append(sparsify.bernoulli(p, (n,), torch.Generator().manual_seed(n), out=buffer).clone())
        return out

    got, want = draw(), _without_native(draw)
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want))
    assert n < 1000 or 0 < float(sum(m.sum() for m in want)) < len(want) * n  # masks, not all 0s or 1s


@pytest.mark.parametrize("n", [1, 8, 13, 4096 + 5])
def test_packed_masks_are_the_torch_paths(n):
    from composer.methods.common import pack_mask, unpack_mask

    mask = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4).float()
    cuts = [(0, n), (n // 3, n), (1 % n, max(1, n - 2)), (n - 1, n)]

    def both():
        packed = pack_mask(mask)
        return [packed, *(unpack_mask(packed, a, b) for a, b in cuts)]

    got, want = both(), _without_native(both)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got[1], mask)


def _bf16_deltas(shape: tuple[int, int], seed: int, small: float) -> torch.Tensor:
    """Task vectors of bfloat16 weights, as the kernel's counted ranks see them: differences of two bfloat16 values,
    mostly of one binade (lower 16 bits 0, long runs of equal magnitudes), a `small` fraction of weights near 0
    whose differences are not."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    base = base.sign() * (0.005 + base.abs() * 0.02)  # away from 0: a weight and its tuned value share a binade
    near = torch.rand(shape, generator=g) < small
    base[near] *= 1e-3
    tuned = (base + torch.randn(shape, generator=g) * 2e-4).to(torch.bfloat16)
    return tuned.float() - base.to(torch.bfloat16).float()


@pytest.fixture
def wide(request):
    """The kernels' AVX-512 forms on (where the CPU has them) or off, for one test."""
    native.use_wide(request.param)
    yield request.param
    native.use_wide(True)


@pytest.mark.parametrize("wide", [True, False], indirect=True, ids=["wide", "scalar"])
@pytest.mark.parametrize("kind", ["float32", "bf16 exact", "bf16 few loose", "bf16 many loose", "bf16 wide",
                                  "bf16 zeros", "bf16 repeats"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2048), (3, 5632), (7, 33)])
def test_della_masks_are_the_torch_paths(shape, kind, wide):
    """DELLA's per-row ranks (equal magnitudes in index order) and keep probabilities, then its mask: on float32
    values, and on bfloat16 weights' task vectors whose lower 16 bits are all 0, or few or many not (the kernel's
    counted ranks, and its sort); with the counting's AVX-512 form and without. "bf16 repeats": a few magnitudes
    only, exact and loose ones in the same bins, so that 16 neighbours share bins (the vector form's conflicts)."""
    from composer.methods.sparsify import della_mask

    if kind == "bf16 repeats":
        g = torch.Generator().manual_seed(15)
        exact = torch.tensor([2.0**-8, 2.0**-8 * 1.5, 2.0**-7, 0.0])
        pick = torch.randint(0, 4, shape, generator=g)
        rows = exact[pick] * torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, -1.0)
        bits = rows.view(torch.int32)
        loose = (torch.rand(shape, generator=g) < 0.04) & (pick < 3)  # lower bits set: the same bins, loose
        rows = torch.where(loose, (bits | torch.randint(1, 4, shape, generator=g, dtype=torch.int32)).view(torch.float32),
                           rows)
    elif kind == "float32":
        rows = _hostile(shape[0] * shape[1], 11).reshape(shape)
        rows[:, ::5] = 0.001  # runs of equal magnitudes, of both signs
        rows[:, 1::10] = -0.001
    elif kind == "bf16 wide":  # bfloat16 values over 120 binades: a wide span of upper values to walk
        g = torch.Generator().manual_seed(13)
        scale = torch.pow(2.0, torch.randint(-120, 1, shape, generator=g).float())
        rows = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16).float()
        rows[:, ::7] = 2.0**-100  # a run of equal values
    elif kind == "bf16 zeros":  # runs of zeros, an all-zero row, inf and NaN: the ends of a row's counted span
        rows = _bf16_deltas(shape, 14, 0.03)
        rows[:, ::3] = 0.0
        rows[0] = 0.0
        if shape[0] > 1:
            rows[-1, 0], rows[-1, -1] = float("inf"), float("nan")
            rows[-1, 1:4] = torch.tensor([0x8000, 0x10000, 0x18000], dtype=torch.int32).view(torch.float32)  # upper 0, 1
    else:
        rows = _bf16_deltas(shape, 12, {"bf16 exact": 0.0, "bf16 few loose": 0.03, "bf16 many loose": 0.3}[kind])
        loose = (rows.abs().view(torch.int32) & 0xFFFF) != 0
        if kind == "bf16 exact":
            assert not bool(loose.any())
        elif shape[1] >= 2048:  # few: the counted ranks (<= 1/16 of a row); many: the sort
            share = float(loose.float().mean())
            assert 0 < share < 1 / 16 if kind == "bf16 few loose" else share > 1 / 16
    got = native.della_probs(rows, 0.5, 0.1)
    mask = della_mask(rows, 0.5, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(mask, _without_native(lambda: della_mask(rows, 0.5, 0.1, torch.Generator().manual_seed(3))))
    # the probabilities themselves, against the torch path's formula on stable ranks
    n = shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    positions = torch.arange(1, n + 1, dtype=torch.float32).expand(shape).contiguous()
    ranks = torch.empty_like(rows).scatter_(1, order, positions)
    rank_norm = ((ranks - 1.0) / float(n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(ranks)
    assert torch.equal(got, (0.5 - 0.1) + rank_norm * 2 * 0.1)


@pytest.mark.parametrize("method,params", [
    ("ties", "{weight: 0.6, density: 0.5}"),
    ("breadcrumbs", "{weight: 0.6, density: 0.8, gamma: 0.05}"),
    ("breadcrumbs_ties", "{weight: 0.6, density: 0.8, gamma: 0.05}"),
    ("dare_ties", "{weight: 0.6, density: 0.5}"),
    ("dare_linear", "{weight: 0.6, density: 0.5}"),
    ("della", "{weight: 0.6, density: 0.5, epsilon: 0.1}"),
    ("della_linear", "{weight: 0.6, density: 0.5, epsilon: 0.1}"),
    ("ram", "{}"),
    ("ramplus_tl", "{}"),
])
@pytest.mark.parametrize("suffix", ["", "-q", "-bf16"])  # -q: values on a 1/64 grid, so the cuts fall in runs of
# ties; -bf16: bfloat16 files, which the kernels read as they are
def test_compose_writes_the_same_model_without_the_kernels(all_models, write_recipe, tmp_path, method, params, suffix,
                                                           monkeypatch):
    models = all_models
    from click.testing import CliRunner

    from composer.cli import main

    recipe = write_recipe(f"""merge_method: {method}
base_model: {models['llama' + suffix]}
dtype: bfloat16
models:
  - model: {models['llama' + suffix]}
  - model: {models['llama-b' + suffix]}
    parameters: {params}
  - model: {models['llama-c' + suffix]}
    parameters: {params}
""")

    def compose(out):
        result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--seed", "5"])
        assert result.exit_code == 0, result.output
        return sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors"))

    calls = {"ties_blend": 0, "hist16_delta": 0, "dare_pass": 0, "della_pass": 0, "ram": 0}
    kinds = set()
    real_inputs = native._inputs
    monkeypatch.setattr(native, "_inputs", lambda base, xs: kinds.update(str(t.dtype) for t in (base, *xs)) or
                        real_inputs(base, xs))
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(native, name), **kwargs):
            done = _fn(*args, **kwargs)
            calls[_name] += done is not None and done is not False
            return done
        monkeypatch.setattr(native, name, counted)
    fast = compose(tmp_path / "fast")
    if method.startswith("ram"):
        assert calls["ram"] > 0, calls
    else:
        drawn = "della_pass" if "della" in method else "dare_pass" if "dare" in method else "hist16_delta"
        # on the 1/64 grid every small tensor's cut falls in a run of ties: those blocks are split at the cut
        assert calls[drawn] > 0 and (calls["ties_blend"] > 0 or suffix and drawn == "hist16_delta"), calls
    assert ("torch.bfloat16" in kinds) == (suffix == "-bf16"), kinds  # the files' own elements, where bfloat16
    assert fast == _without_native(lambda: compose(tmp_path / "torch"))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.015])
def test_ram_kernel_is_the_torch_chain_bit_for_bit(n, epsilon):
    """RAM's and RAM+'s merge and RAM+'s counts (composer.methods.fusion) on values with NaN, +-inf and signed
    zeros, where models agree exactly (deltas of 0) and where some change an element alone."""
    from composer.methods import fusion

    size = 20_000 + 7
    base = _hostile(size, 1)
    xs = [_hostile(size, 2 + i) for i in range(n)]
    for i, x in enumerate(xs):
        x[i::5] = base[i::5]  # unchanged here: elements changed by one model, by several, by none
        x[::7] = -0.0
    base[::11] = -0.0
    got = native.ram(base, xs, epsilon)
    assert _same(got, fusion.ram(base, xs, epsilon=epsilon))
    lambdas = torch.tensor([1.0 + 0.013 * i for i in range(n)]).tolist()
    _, deltas, nonzero, counts, overlap, unique = fusion._ram_parts(base, xs, epsilon)
    want = fusion._ramplus_merge(base, deltas, nonzero, counts, overlap, unique, torch.tensor(lambdas))
    assert _same(native.ram(base, xs, epsilon, lambdas), want)
    tally = torch.zeros((n, 2), dtype=torch.int64)
    assert native.ram(base, xs, epsilon, counts=tally, merge=False) is True
    _, _, nonzero, _, _, unique = fusion._ram_parts(base, xs, epsilon)
    assert torch.equal(tally[:, 0], nonzero.sum(dim=1).long()) and torch.equal(tally[:, 1],
                                                                                 (nonzero * unique).sum(dim=1).long())
    assert 0 < int(tally[:, 1].sum()) < int(tally[:, 0].sum()) or n == 1  # unique and shared changes both occur


@pytest.mark.parametrize("width,offset,count", [(1, 0, 5000), (7, 3, 20_000 + 7), (4096, 100, 9000), (50, 0, 50)])
def test_fusion_gate_is_the_torch_chain_bit_for_bit(width, offset, count):
    """Arcee Fusion's blend (composer.methods.fusion._fusion_blend) from a block that starts inside a row, with
    NaN/+-inf/signed zeros in the inputs and in the rows' KLs."""
    base, x = _hostile(count, 5), _hostile(count, 6)
    x[::3] = base[::3]
    rows = (offset + count + width - 1) // width
    kl = _hostile(rows, 7).abs()
    row_kl = kl.reshape(-1, 1).expand(-1, width).reshape(-1)[offset: offset + count]
    importance = (x - base).abs() * row_kl
    threshold = importance[importance.isfinite()].median()
    mask = (((x - base).abs() * row_kl) >= threshold).float()
    want = base + (x - base) * mask
    got = native.fusion_blend(base, x, kl, offset, width, threshold)
    assert _same(got, want)
    assert 0 < int(mask.sum()) < count
    # the mapped files' bfloat16 elements, converted as they load (rows longer than a tile are split)
    for b16, x16 in [(base.bfloat16(), x.bfloat16()), (base, x.bfloat16()), (base.bfloat16(), x)]:
        bf, xf = b16.float(), x16.float()
        want = bf + (xf - bf) * (((xf - bf).abs() * row_kl) >= threshold).float()
        assert _same(native.fusion_blend(b16, x16, kl, offset, width, threshold), want), (b16.dtype, x16.dtype)


@pytest.mark.parametrize("numel", [1, 2, 255, 256, 257, 700 * 30, 1 << 16, (1 << 16) + 1, (1 << 24) + 1, 1 << 31])
def test_fusion_sample_sort_and_importances_are_torchs(numel):
    """arcee_fusion's sample: the drawn positions sorted as torch.sort sorts them (one to four 8-bit radix passes,
    by numel; int32), and the importances of a piece of whole rows at them the torch chain's, in that order."""
    g = torch.Generator().manual_seed(numel % 1000)
    positions = torch.randint(numel, (50_000,), generator=g)  # repeats where numel is small
    drawn = positions.clone()
    got = native.sort_positions(positions, numel)
    assert got.dtype == torch.int32 and torch.equal(got.long(), drawn.sort().values)
    assert torch.equal(positions, drawn)  # the draw itself untouched
    assert native.sort_positions(positions, (1 << 31) + 1) is None  # past int32: torch sorts
    if numel != 700 * 30:
        return
    width, rows = 700, 30
    base, x = _hostile(numel, 11), _hostile(numel, 12)
    kl = _hostile(rows, 13).abs()
    for a, b in [(0, numel), (3 * width, 11 * width)]:
        at = got[(got >= a) & (got < b)].contiguous()
        want = (x[a:b][at - a] - base[a:b][at - a]).abs() * kl[a // width: b // width][(at - a) // width]
        assert _same(native.fusion_picked(base[a:b], x[a:b], kl[a // width: b // width], width, at, a), want)


@pytest.mark.parametrize("method,top,others,kernels", [
    ("arcee_fusion", "", 1, ("fusion_blend",)),
    ("sce", "parameters: {select_topk: 0.5}", 2, ("sce_var_hist", "sce_masked_squares", "sce_blend")),
    ("sce", "parameters: {select_topk: 1.0}", 2, ("sce_masked_squares", "sce_blend")),
])
@pytest.mark.parametrize("suffix", ["", "-q", "-bf16"])
def test_compose_writes_the_same_fusion_merges_without_the_kernels(all_models, write_recipe, tmp_path, monkeypatch,
                                                                   method, top, others, kernels, suffix):
    models = all_models
    from click.testing import CliRunner

    from composer.cli import main

    names = ["llama-b", "llama-c"][:others]
    recipe = write_recipe(f"""merge_method: {method}
base_model: {models['llama' + suffix]}
dtype: bfloat16
{top}
models:
  - model: {models['llama' + suffix]}
""" + "".join(f"  - model: {models[name + suffix]}\n" for name in names))

    def compose(out):
        result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q", "--seed", "5"])
        assert result.exit_code == 0, result.output
        return sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors"))

    calls = {name: 0 for name in kernels}
    for name in kernels:
        def counted(*args, _name=name, _fn=getattr(native, name), **kwargs):
            done = _fn(*args, **kwargs)
            calls[_name] += done is not None and done is not False
            return done
        monkeypatch.setattr(native, name, counted)
    fast = compose(tmp_path / "fast")
    assert all(calls.values()), calls
    assert fast == _without_native(lambda: compose(tmp_path / "torch"))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_sce_kernels_are_the_torch_chain_bit_for_bit(n, masked):
    """SCE's variance (composer.methods.fusion._sce_variance, float64 Welford) and its erase-and-mean blend, on
    values with NaN, +-inf and signed zeros, with a mask or none, int8 masks or not."""
    from composer.methods import fusion

    size = 20_000 + 7
    base = _hostile(size, 1)
    xs = [_hostile(size, 2 + i) for i in range(n)]
    for i, x in enumerate(xs):
        x[i::5] = base[i::5]
        x[::7] = -0.0
    deltas = torch.stack([x - base for x in xs], dim=0)
    assert _same(native.sce_variance(base, xs), fusion._sce_variance(deltas))
    out = torch.full((size,), 7.0)
    assert native.sce_variance(base, xs, out) is out and _same(out, fusion._sce_variance(deltas))
    hist, keys = torch.zeros(1 << 16, dtype=torch.int64), fusion._sce_variance(deltas).abs().view(torch.int32)
    assert native.sce_var_hist(base, xs, hist)  # pass 1: the variance's keys, counted in the same pass
    assert torch.equal(hist, torch.bincount((-keys).bitwise_right_shift_(16).neg_().add_(keys >> 16),
                                            minlength=1 << 16))
    # the mean-squares pass: the mask from Keep.steps (each end's kept-at-zero both ways, a lo end only, nothing
    # kept) and the squares' float64 lanes, against Keep.mask and add_square_lanes, in two calls (lanes go on)
    var = fusion._sce_variance(deltas).abs()
    finite = var[var.isfinite()]
    lo, hi = float(finite.quantile(0.3)), float(finite.quantile(0.8))
    for steps in [(lo, True, hi, False), (lo, False, hi, True), (lo, True, None, True), (), None]:
        got, want = (torch.zeros(n, fusion.SQUARE_LANES, dtype=torch.float64) for _ in range(2))
        for a, b in [(0, 4096), (4096, size)]:
            mask = None if steps is None else torch.full((b - a,), 5.0)
            assert native.sce_masked_squares(base[a:b], [x[a:b] for x in xs], steps, mask, got)
            want_mask = None
            if steps is not None:
                want_mask = torch.zeros(b - a) if steps == () else ranked._step(var[a:b] - steps[0], steps[1])
                if steps and steps[2] is not None:
                    want_mask = want_mask * ranked._step(steps[2] - var[a:b], steps[3])
                assert _same(mask, want_mask), steps
            fusion.add_square_lanes(deltas[:, a:b], want_mask, want)
        assert _same(got, want), steps
    given = (torch.rand(size, generator=torch.Generator().manual_seed(n + 9)) < 0.5).float()  # Keep.mask's, made
    got, want = (torch.zeros(n, fusion.SQUARE_LANES, dtype=torch.float64) for _ in range(2))
    assert native.sce_masked_squares(base, xs, None, given.clone(), got)
    fusion.add_square_lanes(deltas, given, want)
    assert _same(got, want)
    mask = (torch.rand(size, generator=torch.Generator().manual_seed(n)) < 0.6).float() if masked else None
    if mask is not None:
        deltas = deltas * mask.unsqueeze(0)
    w = fusion._sce_weights(torch.nan_to_num(deltas, nan=0.0, posinf=1.0, neginf=-1.0))
    w[-1] = 0.0  # a zero weight: sums of erased weights at 0, clamped to 1e-6
    got = native.sce_blend(base, xs, mask, w)
    for int8 in (False, True):
        assert _same(got, fusion._sce_erase_mean(base, deltas, w, int8))


@pytest.mark.parametrize("n", [1, 3])
def test_sce_nth_equal_finds_the_variance_run_as_torch(n):
    """The index of the rank-th element whose |variance| has given bits (SCE's cut run), as the torch scan finds
    it, and -1 - the count past the run's end."""
    from composer.methods import fusion

    size = 3 * 2048 + 11
    base = _hostile(size, 30).bfloat16()
    xs = [(base.float() + torch.randint(-2, 3, (size,), generator=torch.Generator().manual_seed(i)) / 64).bfloat16()
          for i in range(n)]
    var = fusion._sce_variance(torch.stack([x.float() - base.float() for x in xs])).abs().view(torch.int32)
    bits = int(var[var != 0x7FC00000].mode().values)  # the most common value: a long run
    where = torch.nonzero(var == bits).reshape(-1)
    for rank in (0, 1, len(where) // 2, len(where) - 1):
        assert native.sce_nth_equal(base, xs, bits, rank) == int(where[rank])
    assert native.sce_nth_equal(base, xs, bits, len(where)) == -1 - len(where)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_kernels_take_bfloat16_inputs_as_their_float32_values(n):
    """The kernels that load inputs (composer.methods.method.MergeJob.read_raw: the files' bfloat16) give the bits
    they give for those inputs converted to float32, which is what the torch path computes on; unaligned or
    other-dtype inputs are refused (the caller then takes the torch path)."""
    from composer.methods import fusion

    size = 20_000 + 7
    base16 = _hostile(size, 1).bfloat16()
    xs16 = [_hostile(size, 2 + i).bfloat16() for i in range(n)]
    for i, x in enumerate(xs16):
        x[i::5] = base16[i::5]
    base, xs = base16.float(), [x.float() for x in xs16]
    mixed = [x if i % 2 else x.float() for i, x in enumerate(xs16)]  # float32 and bfloat16 in one call
    hist16, hist32 = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
    assert native.hist16_delta(xs16[0], base16, hist16) and native.hist16_delta(xs[0], base, hist32)
    assert torch.equal(hist16, hist32)
    steps = [ranked.Keep(_end(0.001, True), _end(3e38, True, top=True)).steps(0, size) for _ in range(n)]
    w = torch.tensor([0.3 + 0.2 * i for i in range(n)])
    blend = dict(consensus=True, normalize=True, divisor=1.0, lambda_=1.0)
    assert _same(native.ties_blend(base16, mixed, steps, [None] * n, w, **blend),
                 native.ties_blend(base, xs, steps, [None] * n, w, **blend))
    assert _same(native.ram(base16, mixed, 1e-5, [1.02] * n), native.ram(base, xs, 1e-5, [1.02] * n))
    assert _same(native.sce_variance(base16, mixed), fusion._sce_variance(torch.stack([x - base for x in xs])))
    hist16, hist32 = torch.zeros(1 << 16, dtype=torch.int64), torch.zeros(1 << 16, dtype=torch.int64)
    assert native.sce_var_hist(base16, mixed, hist16) and native.sce_var_hist(base, xs, hist32)
    assert torch.equal(hist16, hist32)
    lanes16, lanes32 = torch.zeros(n, 8, dtype=torch.float64), torch.zeros(n, 8, dtype=torch.float64)
    mask16, mask32 = torch.empty(size), torch.empty(size)
    assert native.sce_masked_squares(base16, mixed, (1e-4, True, None, True), mask16, lanes16)
    assert native.sce_masked_squares(base, xs, (1e-4, True, None, True), mask32, lanes32)
    assert _same(lanes16, lanes32) and torch.equal(mask16, mask32)
    assert _same(native.sce_blend(base16, mixed, None, w), native.sce_blend(base, xs, None, w))
    assert native.ram(base16.half(), xs16, 1e-5) is None  # float16: not taken
    odd = torch.empty(size + 1, dtype=torch.bfloat16)[1:]  # storage offset of one element: aligned to 2 bytes
    assert native.ram(odd, xs16, 1e-5) is not None
    unaligned = torch.frombuffer(bytearray(2 * size + 1), dtype=torch.bfloat16, offset=1, count=size)
    assert native.ram(unaligned, xs16, 1e-5) is None  # an odd address: refused


def test_the_avx2_build_gives_the_portable_builds_bits(monkeypatch):
    """Where the CPU has AVX2 the kernels are built with -mavx2 (wider loops); the portable build (SSE2 on
    x86-64) must give the same bits, kernel by kernel, on hostile values and on bfloat16 inputs."""
    if not native.isa_flags():
        pytest.skip("no AVX2 here: only the portable build exists")
    size = 50_000 + 3
    base = _hostile(size, 21)
    xs = [base + torch.randn(size, generator=torch.Generator().manual_seed(30 + i)) * 0.002 for i in range(3)]
    halves = [t.to(torch.bfloat16) for t in (base, *xs)]
    rows = _bf16_deltas((5, 2048), 22, 0.03)
    steps = [(0.001, True, None, False), (0.001, False, 0.004, True), None]

    def outputs() -> list[torch.Tensor]:
        got = []
        for b, x in ((base, xs), (halves[0], halves[1:])):
            for consensus in (True, False):
                got.append(native.ties_blend(b, x, steps, [None, 1.5, None], torch.tensor([0.3, 0.5, 0.2]),
                                             consensus=consensus, normalize=True, divisor=1.0, lambda_=0.9))
            got.append(native.ram(b, x, 1e-3, [0.4, 0.6, 0.5]))
            got.append(native.sce_variance(b, x))
            hist = torch.zeros(1 << 16, dtype=torch.int64)
            assert native.hist16_delta(x[0], b, hist)
            got.append(hist)
            bits, lanes = torch.zeros(size // 8 + 1, dtype=torch.uint8), torch.zeros(2, native.LANES,
                                                                                     dtype=torch.float64)
            assert native.dare_pass(x[1], b, 2**63 + 7, 0.3, bits, lanes)
            got += [bits, lanes]
            bits, lanes = bits.clone(), lanes.clone()
            assert native.della_pass(x[0][:5 * 999], b[:5 * 999], 999, 0.5, 0.1, 12, bits, lanes)
            got += [bits, lanes]
        lanes = torch.zeros(2, native.LANES, dtype=torch.float64)
        assert native.lane_sums(xs[2] - base, (xs[0] > base).float(), lanes)
        got.append(lanes)
        got.append(native.della_probs(rows, 0.5, 0.1))
        got.append(native.della_probs(_hostile(3 * 999, 23).reshape(3, 999), 0.4, 0.2))
        assert all(g is not None for g in got)
        return got

    wide = outputs()
    wide_lib = native.library()._name
    monkeypatch.setenv("COMPOSER_NATIVE_AVX2", "0")
    native.reset()
    try:
        narrow = outputs()
        assert native.library()._name != wide_lib  # another build, not the cached one
    finally:
        monkeypatch.delenv("COMPOSER_NATIVE_AVX2")
        native.reset()
    assert all(_same(a, b) if a.is_floating_point() else torch.equal(a, b) for a, b in zip(wide, narrow))


def test_avx512_forms_follow_the_switch(monkeypatch):
    """COMPOSER_NATIVE_AVX512=0 keeps DELLA's AVX-512 forms off from the library's load; use_wide turns them on
    again where the CPU has them (whether it does: /proc/cpuinfo's flags, on Linux x86-64)."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    has = {"avx512f", "avx512cd", "avx512dq", "avx512_vpopcntdq"} <= flags
    monkeypatch.setenv("COMPOSER_NATIVE_AVX512", "0")
    native.reset()
    try:
        assert native.library() is not None
        assert native.library().composer_wide() == 0
        assert native.use_wide(True) == has
    finally:
        monkeypatch.delenv("COMPOSER_NATIVE_AVX512")
        native.reset()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("with_base", [True, False])
def test_angle_lanes_are_the_torch_lanes_bit_for_bit(n, with_base):
    """model_stock's and nuslerp's angle sums: the kernel's float64 lanes of the vectors' products (float32 or
    bfloat16 inputs, a base or none, NaN/inf included, calls continuing the lanes with a ragged last one) equal
    composer.methods.averaging.add_angle_lanes's torch ones, and their totals the products' exact sums within
    float64 rounding."""
    from composer.methods import averaging

    count = 3 * 2048 + 4 * 37 + 3
    for dtype in (torch.float32, torch.bfloat16):
        base = _hostile(count, 20).to(dtype) if with_base else None
        xs = [(_hostile(count, 21 + i) * (i + 1)).to(dtype) for i in range(n)]
        pairs = n * (n + 1) // 2
        got, want = (torch.zeros(pairs, 8, dtype=torch.float64) for _ in range(2))
        for a, b in [(0, 2048 + 8), (2048 + 8, count)]:  # the first run a multiple of 8, the last ragged
            cut = [x[a:b] for x in xs]
            assert native.angle_lanes(None if base is None else base[a:b], cut, got)
            b32 = None if base is None else base[a:b].float()
            averaging.add_angle_lanes([x.float() if b32 is None else x.float() - b32 for x in cut], want)
        assert _same(got, want), dtype
    finite = [x.nan_to_num(0.0, 0.0, 0.0) for x in xs]
    base = None if base is None else base.nan_to_num(0.0, 0.0, 0.0)
    v = [x.double() if base is None else (x.float() - base.float()).double() for x in finite]
    sums = averaging.block_angle_sums(lambda a, b: [t[a:b].float() for t in v], 0, count,
                                      lambda a, b: (None if base is None else base[a:b], [x[a:b] for x in finite]))
    exact = torch.stack([v[i] @ v[j] for i, j in averaging._pairs(n)])
    assert torch.allclose(sums, exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method,params,base", [
    ("model_stock", "{}", True),
    ("karcher", "{}", False),
    ("multislerp", "{weight: 0.7}", True),
    ("multislerp", "{weight: 0.7}", False),
    ("slerp", "{t: 0.3}", True),
    ("nuslerp", "{weight: 0.7}", True),
    ("nuslerp", "{weight: 0.7}", False),
])
@pytest.mark.parametrize("suffix", ["", "-bf16"])
def test_compose_writes_the_same_combinations_without_the_kernels(all_models, write_recipe, tmp_path, monkeypatch,
                                                                  method, params, base, suffix):
    """model_stock's, karcher's, multislerp's, slerp's and nuslerp's streamed blends (composer.native.combination)
    and model_stock's and nuslerp's angle sums (composer.native.angle_lanes) on blocks of 1024 elements, so every
    tensor streams: the same bytes with and without the kernels."""
    from click.testing import CliRunner

    from composer import ranked
    from composer.cli import main

    monkeypatch.setattr(ranked, "BLOCK", 1024)
    models = all_models
    head = f"base_model: {models['llama' + suffix]}\n" if base else ""
    if method == "slerp":  # a base and one other model
        head += f"parameters: {params}\n"
        params = "{}"
    names = ["llama", "llama-b"] if method == "slerp" or method == "nuslerp" and not base else \
        ["llama", "llama-b", "llama-c"]
    listed = "".join(f"  - model: {models[name + suffix]}\n    parameters: {params}\n" for name in names)
    recipe = write_recipe(f"""merge_method: {method}
{head}dtype: bfloat16
models:
{listed}""")
    calls, angles = [], []
    real, real_angles = native.combination, native.angle_lanes
    monkeypatch.setattr(native, "combination", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(native, "angle_lanes", lambda *a, **k: angles.append(1) or real_angles(*a, **k))

    def compose(out):
        result = CliRunner().invoke(main, [str(recipe), "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        return sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors"))

    fast = compose(tmp_path / "fast")
    assert calls and bool(angles) == (method in ("model_stock", "nuslerp"))  # the angle sums' kernel too
    assert fast == _without_native(lambda: compose(tmp_path / "torch"))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("with_base", [True, False])
def test_combination_kernel_is_the_torch_chains_bit_for_bit(n, with_base):
    """composer.native.combination against the torch chains it replaces, on values with NaN, +-inf and signed
    zeros: the combination (karcher, multislerp, slerp, nuslerp colinear), divided (nuslerp), model_stock's."""
    from composer.methods.averaging import model_stock_blend
    from composer.methods.spherical import nuslerp_blend

    size = 20_000 + 7
    base = _hostile(size, 40)
    xs = [base + torch.randn(size, generator=torch.Generator().manual_seed(41 + i)) * 0.002 for i in range(n)]
    for i, x in enumerate(xs):
        x[i::89] = _hostile(len(x[i::89]), 50 + i)
    c = [torch.tensor(0.37 - 0.2 * i) for i in range(n)]

    want = None
    for i, x in enumerate(xs):  # combination_blend's steps
        term = (x - base if with_base else x.clone()).mul_(c[i])
        want = term if want is None else want.add_(term)
    want = want + base if with_base else want
    assert _same(native.combination(base if with_base else None, xs, [float(v) for v in c]), want)
    if n == 2:
        s0, s1, sin = torch.tensor(0.61), torch.tensor(0.43), torch.tensor(0.97)
        v0, v1 = (x - base for x in xs) if with_base else xs
        merged = nuslerp_blend(v0, v1, 0.3, (s0, s1, sin))
        got = native.combination(base if with_base else None, xs, [float(s0), float(s1)], divisor=float(sin))
        assert _same(got, base + merged if with_base else merged)
        # colinear: (1 - t) v0 + t v1, the Python floats rounded to float32 as torch's scalar multiply rounds them
        t32 = [float(torch.tensor(v, dtype=torch.float32)) for v in (1 - 0.3, 0.3)]
        merged = nuslerp_blend(v0, v1, 0.3, None)
        assert _same(native.combination(base if with_base else None, xs, t32), base + merged if with_base else merged)
    if with_base:
        t = torch.tensor(0.71)
        assert _same(native.combination(base, xs, [float(t), float(1 - t)], stock=True),
                     model_stock_blend(base, xs, t))


def _plain_lanes(v: torch.Tensor, m: torch.Tensor) -> list[list[float]]:
    """add_l1_lanes written plainly: element j's |v| and |v| * m (float32 products) into float64 lane j % 16."""
    mag = v.abs()
    lanes = [[0.0] * native.LANES, [0.0] * native.LANES]
    for j, (a, b) in enumerate(zip(mag.tolist(), (mag * m).tolist())):
        lanes[0][j % native.LANES] += a
        lanes[1][j % native.LANES] += b
    return lanes


def _same_lanes(a: torch.Tensor, b) -> bool:
    return _same(a.view(-1), torch.tensor(b, dtype=torch.float64).view(-1))


@pytest.mark.parametrize("n", [1, 15, 16, 2048 + 17, 20_007])
def test_l1_lanes_are_the_plain_sums_natively_and_in_torch(n):
    """DARE's and DELLA's L1 sums, in lanes of fixed order: the kernel and the torch path (cumsum) against the
    sums written plainly, on hostile values (NaN, inf, zeros, tiny, huge) and across calls that carry the lanes."""
    from composer.methods.common import add_l1_lanes, l1_total

    v = _hostile(n, 70 + n)
    v[: n // 2] = torch.randn(n // 2, generator=torch.Generator().manual_seed(n)) * 1e-3  # sums without NaN
    m = (torch.rand(n, generator=torch.Generator().manual_seed(71)) < 0.5).float()
    cut = n // 32 * 16  # the first call takes a multiple of LANES

    def lanes():
        out = torch.zeros(2, native.LANES, dtype=torch.float64)
        add_l1_lanes(v[:cut], m[:cut], out)
        add_l1_lanes(v[cut:], m[cut:], out)
        half = torch.zeros(2, native.LANES, dtype=torch.float64)
        add_l1_lanes(v[: n // 2], m[: n // 2], half)
        return out, half

    (fast, fast_half), (slow, slow_half) = lanes(), _without_native(lanes)
    want = _plain_lanes(v, m)
    assert _same_lanes(fast, want) and _same_lanes(slow, want)
    assert _same_lanes(fast_half, _plain_lanes(v[: n // 2], m[: n // 2])) and _same(fast_half, slow_half)
    assert l1_total(fast_half) == [_sequential(row) for row in _plain_lanes(v[: n // 2], m[: n // 2])]


def _sequential(row: list[float]) -> float:
    total = 0.0
    for value in row:
        total += value
    return total


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("n", [1, 2047, 2 * 2048 + 9])
def test_dare_pass_is_the_torch_chain(half, n):
    """DARE's rescale pass in one kernel: its packed mask is pack_mask of bernoulli's from the same key, its lanes
    add_l1_lanes' of |x - base| and the kept part, on hostile values and on bfloat16 inputs; a pass split at a
    multiple of 16 elements (the next part keyed with key_at) gives the same bits and lanes."""
    from composer.methods.common import add_l1_lanes, pack_mask
    from composer.methods.sparsify import bernoulli, key_at

    base = _hostile(n, 80)
    x = base + torch.randn(n, generator=torch.Generator().manual_seed(81)) * 0.002
    x[::53] = _hostile(len(x[::53]), 82)
    if half:
        base, x = base.to(torch.bfloat16), x.to(torch.bfloat16)
    key, p = 2**63 + 12345, 0.3
    mask = bernoulli(p, n, None, key=key)
    want_bits = pack_mask(mask)
    want_lanes = torch.zeros(2, native.LANES, dtype=torch.float64)
    add_l1_lanes(x.float() - base.float(), mask, want_lanes)
    assert _same_lanes(want_lanes, _plain_lanes(x.float() - base.float(), mask))

    bits, lanes = torch.full((n // 8 + 3,), 0xAB, dtype=torch.uint8), torch.zeros(2, native.LANES, dtype=torch.float64)
    assert native.dare_pass(x, base, key, p, bits, lanes)
    assert torch.equal(bits[: len(want_bits)], want_bits) and _same(lanes, want_lanes)
    assert torch.equal(bits[len(want_bits):], torch.full((len(bits) - len(want_bits),), 0xAB, dtype=torch.uint8))

    cut = n // 32 * 16
    split_bits, split_lanes = torch.zeros(n // 8 + 1, dtype=torch.uint8), torch.zeros(2, native.LANES,
                                                                                       dtype=torch.float64)
    assert native.dare_pass(x[:cut], base[:cut], key, p, split_bits, split_lanes)
    assert native.dare_pass(x[cut:], base[cut:], key_at(key, cut), p, split_bits[cut // 8:], split_lanes)
    assert torch.equal(split_bits[: len(want_bits)], want_bits) and _same(split_lanes, want_lanes)


@pytest.mark.parametrize("wide", [True, False], indirect=True, ids=["wide", "scalar"])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("rows,width", [(1, 7), (3, 999), (5, 2048), (2, 4096 + 48), (1, 70_000)])
def test_della_pass_is_the_torch_chain(half, rows, width, wide):
    """DELLA's rescale pass in one kernel: its packed mask is pack_mask of della_mask's (ranks, probabilities and
    bernoulli's draws from the same key), its lanes add_l1_lanes' of the deltas and that mask, on hostile values,
    on bfloat16 inputs and on rows that take the radix sort (70,000 wide); with its AVX-512 forms and without
    (rows of a multiple of 16, 2048 and 4144, take them: one tile, and a tile and a part)."""
    from composer.methods.common import add_l1_lanes, pack_mask
    from composer.methods.sparsify import della_mask

    n = rows * width
    base = _hostile(n, 90)
    x = base + torch.randn(n, generator=torch.Generator().manual_seed(91)) * 0.002
    x[::53] = _hostile(len(x[::53]), 92)
    if half:
        base, x = base.to(torch.bfloat16), x.to(torch.bfloat16)
    key, density, epsilon = 2**63 + 99, 0.5, 0.2
    delta = x.float() - base.float()

    def want():
        mask = della_mask(delta.reshape(rows, width), density, epsilon, None, key=key).reshape(-1)
        lanes = torch.zeros(2, native.LANES, dtype=torch.float64)
        add_l1_lanes(delta, mask, lanes)
        return pack_mask(mask), lanes

    (bits_k, lanes_k), (bits_t, lanes_t) = want(), _without_native(want)  # della_probs natively, and the sort
    assert torch.equal(bits_k, bits_t) and _same(lanes_k, lanes_t)
    bits, lanes = torch.full((n // 8 + 3,), 0xAB, dtype=torch.uint8), torch.zeros(2, native.LANES, dtype=torch.float64)
    assert native.della_pass(x, base, width, density, epsilon, key, bits, lanes)
    assert torch.equal(bits[: len(bits_k)], bits_k) and _same(lanes, lanes_k)
    assert torch.equal(bits[len(bits_k):], torch.full((len(bits) - len(bits_k),), 0xAB, dtype=torch.uint8))
    assert not native.della_pass(x, base, width + 1, density, epsilon, key, bits, lanes)  # not whole rows


@pytest.mark.parametrize("p", [0.0, 2.0**-31, 2.0**-28, 1e-7, 0.3, 0.5, 0.9, 1.0 - 2.0**-24, 1.0, 1.5, -0.5,
                               float("nan")])
def test_keep_count_is_where_bernoulli_stops_keeping(p):
    """dare_pass keeps 31 random bits h where h < keep_count(p): exactly where bernoulli's (float32) h * 2**-31 < p
    holds, tested at the count's boundary, in float32 as torch computes it."""
    count = native.keep_count(p)

    def kept(h: int) -> bool:
        return bool(torch.tensor(h, dtype=torch.int32).float() * 2.0**-31 < torch.tensor(p))  # sparsify._scaled

    assert 0 <= count <= 2**31
    assert (count == 0 or kept(count - 1)) and (count == 2**31 or not kept(count))
    # h from 2**30 - 32 on rounds to 2**30 in float32: 0.5 keeps 32 values fewer than half of them
    assert count == {0.0: 0, 2.0**-31: 1, 2.0**-28: 8, 0.5: 2**30 - 32, 1.5: 2**31, -0.5: 0}.get(p, count)


def test_key_at_starts_the_stream_at_an_element():
    """key_at(key, e) is the stream of `key` from element e on (e even): what lets a pass draw its pieces alone."""
    from composer.methods.sparsify import bernoulli, key_at

    for key in (0, 5, 2**64 - 1):
        whole = bernoulli(0.4, 1000, None, key=key)
        for e in (0, 2, 334, 998):
            assert torch.equal(bernoulli(0.4, 1000 - e, None, key=key_at(key, e)), whole[e:])
            assert torch.equal(_without_native(lambda: bernoulli(0.4, 1000 - e, None, key=key_at(key, e))),
                               whole[e:])


@pytest.mark.parametrize("key", [0, 1, 12345678901234567, (1 << 63) - 1, 2**63 + 5])
def test_splitmix_words_are_the_plain_stream_natively_and_in_torch(key):
    """The random methods' SplitMix64 words: the kernel's and torch's int64 arithmetic (the fallback) against the
    generator written plainly in Python integers."""
    from composer.methods.sparsify import splitmix_words
    from tinymodels import plain_splitmix

    want = torch.tensor([w - (1 << 64) if w >= 1 << 63 else w for w in plain_splitmix(key, 1001)], dtype=torch.int64)
    fast = splitmix_words(key, torch.empty(1001, dtype=torch.int64))
    slow = _without_native(lambda: splitmix_words(key, torch.empty(1001, dtype=torch.int64)))
    assert torch.equal(fast, want) and torch.equal(slow, want)
