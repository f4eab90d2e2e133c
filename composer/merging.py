"""Merged tensors: computed block by block straight into the output chunks where the method allows, after
streamed passes for whole-tensor statistics where it needs them (the angles of slerp, model_stock and nuslerp,
TIES's magnitude cut, DARE's and DELLA's rescale), else whole, once; each served to the chunks it spans until
fully served."""
from __future__ import annotations

import threading

from composer.blocks import output_view, read_block, rows_grid, task_vector_parts, tensor_seed
from composer.dtypes import torch_dtype
from composer.tensorplan import CHUNK_ELEMENTS, DELLA, TensorPlan, merge_mode


_LOCAL = threading.local()  # per-thread work buffers, reused from tensor to tensor


def _apply(t: TensorPlan, inputs: list, seed: int):
    """The method on loaded inputs (whole tensors, or one block of an elementwise merge)."""
    import torch

    from composer.methods import METHODS

    spec = METHODS[t.op]
    keep = [k for k in range(len(inputs)) if k != t.base or spec.per_input_includes_base]
    per_input = {name: [dict(t.input_params[k])[name] for k in keep] for name in spec.per_input}
    generator = torch.Generator().manual_seed(tensor_seed(seed, t.name)) if spec.random else None
    base = inputs[t.base] if t.base is not None and spec.base != "ignored" else None
    return spec.apply([inputs[k] for k in keep], base=base,
                      shared=dict(t.params), per_input=per_input, generator=generator)


class Merged:
    """Merged tensors, computed block by block after streamed passes for their statistics where the method needs
    them, else whole, once, and served to the chunks they span until fully served."""

    def __init__(self, sources, seed: int) -> None:
        self._sources, self._seed = sources, seed
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}  # name -> [lock, whole bytes or the statistics, bytes to serve]

    def _entry(self, t: TensorPlan) -> list:
        with self._lock:
            return self._entries.setdefault(t.name, [threading.Lock(), None, t.nbytes])

    def _served(self, t: TensorPlan, entry: list, n: int) -> None:
        with entry[0]:
            entry[2] -= n
            done = entry[2] == 0
        if done:
            with self._lock:
                del self._entries[t.name]

    def copy_into(self, t: TensorPlan, view: memoryview, start: int) -> None:
        import torch

        mode, entry = merge_mode(t), self._entry(t)
        work, out_dt = torch_dtype(t.via or t.inputs[0].dtype), torch_dtype(t.dtype)
        if mode == "whole":
            with entry[0]:
                if entry[1] is None:
                    result = _apply(t, [read_block(i, t, self._sources).reshape(i.shape) for i in t.inputs], self._seed)
                    entry[1] = bytearray(t.nbytes)
                    torch.frombuffer(entry[1], dtype=out_dt).copy_(result.reshape(-1).to(work))
                view[:] = memoryview(entry[1])[start: start + len(view)]
        elif mode == "ranked":
            self._ranked_into(t, entry, view, start)
        elif mode == "random":
            self._random_into(t, entry, view, start)
        elif mode == "slerp":
            self._slerp_into(t, entry, view, start)
        elif mode == "angles":
            self._angles_into(t, entry, view, start)
        elif mode == "rows":
            self._rows_into(t, view, start)
        elif mode == "columns":
            self._columns_into(t, entry, view, start)
        else:
            out, work, first, _ = output_view(t, view, start)
            for a in range(0, out.numel(), CHUNK_ELEMENTS):
                b = min(out.numel(), a + CHUNK_ELEMENTS)
                inputs = [read_block(i, t, self._sources, first + a, first + b) for i in t.inputs]
                out[a:b].copy_(_apply(t, inputs, self._seed).reshape(-1).to(work))
        self._served(t, entry, len(view))

    def _slerp_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """SLERP: its coefficients from one streamed pass over both inputs (once per tensor, steps on both cores),
        then c0 * base + c1 * other block by block, in two float32 buffers kept by the thread: a fresh temporary
        per step cost ~8x the arithmetic (allocation, page faults, one more pass over memory)."""
        import torch

        from composer import ranked
        from composer.methods import averaging

        base, other = t.inputs[t.base], t.inputs[1 - t.base]
        with entry[0]:
            if entry[1] is None:
                def read(s: int, e: int):
                    if not hasattr(_LOCAL, "slerp"):  # one [2, SLERP_CHUNK] buffer per pass thread, kept for its life
                        _LOCAL.slerp = torch.empty(2, averaging.SLERP_CHUNK)
                    pair = _LOCAL.slerp
                    read_block(base, t, self._sources, s, e, pair[0])
                    read_block(other, t, self._sources, s, e, pair[1])
                    return pair[:, : e - s]

                entry[1] = averaging.slerp_coefficients(read, t.numel, dict(t.params)["t"], each=ranked.each)
            c0, c1 = (c.reshape(()) for c in entry[1])  # 0-dim: a [1, 1] broadcast over 1-D blocks is 20x slower
        out, work, first, _ = output_view(t, view, start)
        if not hasattr(_LOCAL, "blend"):
            _LOCAL.blend = torch.empty(CHUNK_ELEMENTS), torch.empty(CHUNK_ELEMENTS)
        for a in range(0, out.numel(), CHUNK_ELEMENTS):
            b = min(out.numel(), a + CHUNK_ELEMENTS)
            x = read_block(base, t, self._sources, first + a, first + b, _LOCAL.blend[0]).mul_(c0)
            y = read_block(other, t, self._sources, first + a, first + b, _LOCAL.blend[1]).mul_(c1)
            merged = x.add_(y)  # rounds as c0 * base + c1 * other: two products, then their sum
            out[a:b].copy_(merged if work == out.dtype else merged.to(work))

    def _rows_into(self, t: TensorPlan, view: memoryview, start: int) -> None:
        """A method that works row by row (model_stock per row, nuslerp per row), on blocks of whole rows: as
        many as fit in ranked.BLOCK elements; a block that two chunks share is computed for each."""
        from composer import ranked

        width, grid = rows_grid(t, ranked.BLOCK)
        out, work, first, last = output_view(t, view, start)
        for ga in range(first - first % grid, last, grid):
            gb = min(t.numel, ga + grid)
            shape = (-1, width) if len(t.shape) == 2 else (-1,)
            block = _apply(t, [read_block(i, t, self._sources, ga, gb).reshape(shape) for i in t.inputs], self._seed)
            a, b = max(ga, first), min(gb, last)
            out[a - first: b - first].copy_(block.reshape(-1)[a - ga: b - ga].to(work))

    def _angles_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """model_stock and flattened nuslerp: the angles between the whole task vectors (or inputs) from float64
        sums streamed over blocks, once per tensor; then their blend, block by block."""
        from composer import ranked
        from composer.methods import averaging

        _, others, _, per_input = task_vector_parts(t)

        def vectors(a: int, b: int) -> tuple:
            base = read_block(t.inputs[t.base], t, self._sources, a, b) if t.base is not None else None
            return base, [read_block(t.inputs[k], t, self._sources, a, b) for k in others]

        def sums(a: int, b: int):
            base, xs = vectors(a, b)
            return averaging.angle_sums(xs if base is None else [x - base for x in xs])

        with entry[0]:
            if entry[1] is None:
                total = sum(ranked.each(sums, ranked.blocks(0, t.numel)))
                if t.op == "model_stock":
                    entry[1] = averaging.model_stock_t(total, len(others))
                else:
                    weight = averaging.nuslerp_t(per_input["weight"])
                    entry[1] = weight, averaging.nuslerp_angle(total, weight)
            stat = entry[1]
        out, work, first, _ = output_view(t, view, start)
        for a in range(0, out.numel(), CHUNK_ELEMENTS):
            b = min(out.numel(), a + CHUNK_ELEMENTS)
            base, xs = vectors(first + a, first + b)
            if t.op == "model_stock":
                merged = averaging.model_stock_blend(base, xs, stat)
            elif base is None:
                merged = averaging.nuslerp_blend(xs[0], xs[1], *stat)
            else:
                merged = base + averaging.nuslerp_blend(xs[0] - base, xs[1] - base, *stat)
            out[a:b].copy_(merged.to(work))

    def _columns_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """nuslerp per column (nuslerp_row_wise): float64 sums per column streamed over blocks of whole rows, once
        per tensor, then the blend on blocks of whole rows, as _rows_into cuts them. A 1-D tensor is one column."""
        from composer import ranked
        from composer.methods import averaging

        _, others, _, per_input = task_vector_parts(t)
        width = t.shape[-1] if len(t.shape) == 2 else 1

        def vectors(a: int, b: int) -> tuple:
            """Elements [a, b) (whole rows) of the two vectors, the inputs or their task vectors, and the base."""
            xs = [read_block(t.inputs[k], t, self._sources, a, b).reshape(-1, width) for k in others]
            if t.base is None:
                return xs, None
            base = read_block(t.inputs[t.base], t, self._sources, a, b).reshape(-1, width)
            return [x - base for x in xs], base

        with entry[0]:
            if entry[1] is None:
                _, grid = rows_grid(t, ranked.BLOCK, width)
                total = sum(ranked.each(lambda a, b: averaging.column_sums(*vectors(a, b)[0]),
                                        [(a, min(t.numel, a + grid)) for a in range(0, t.numel, grid)]))
                weight = averaging.nuslerp_t(per_input["weight"])
                entry[1] = weight, averaging.nuslerp_column_angles(total, weight)
            weight, angles = entry[1]
        _, grid = rows_grid(t, CHUNK_ELEMENTS, width)
        out, work, first, last = output_view(t, view, start)
        for ga in range(first - first % grid, last, grid):
            gb = min(t.numel, ga + grid)
            xs, base = vectors(ga, gb)
            merged = averaging.nuslerp_column_blend(xs[0], xs[1], weight, angles)
            merged = (merged if base is None else base + merged).reshape(-1)
            a, b = max(ga, first), min(gb, last)
            out[a - first: b - first].copy_(merged[a - ga: b - ga].to(work))

    def _ranked_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """A magnitude-pruned merge: which elements each task vector keeps is found once in streamed passes
        (composer.ranked); then each block of the output is elementwise."""
        from composer import ranked
        from composer.methods import streamed_task_arithmetic
        from composer.methods.sparsify import kept_range

        spec, others, shared, per_input = task_vector_parts(t)

        def deltas(a: int, b: int) -> list:
            base = read_block(t.inputs[t.base], t, self._sources, a, b)
            return [read_block(t.inputs[k], t, self._sources, a, b) - base for k in others]

        with entry[0]:
            if entry[1] is None:
                gammas = per_input.get("gamma", [None] * len(others)) if t.op != "ties" else [None] * len(others)
                densities = per_input.get("density", [1.0] * len(others))
                rescale = bool({**spec.shared, **shared}["rescale"])
                entry[1] = ranked.select(deltas, t.numel, [kept_range(t.numel, float(d), None if g is None else float(g))
                                                           for d, g in zip(densities, gammas)], rescale)
            keeps = entry[1]
        out, work, first, last = output_view(t, view, start)
        for a in range(first, last, CHUNK_ELEMENTS):
            b = min(last, a + CHUNK_ELEMENTS)
            base = read_block(t.inputs[t.base], t, self._sources, a, b)
            xs = [read_block(t.inputs[k], t, self._sources, a, b) for k in others]
            merged = streamed_task_arithmetic(t.op, base, xs, shared, per_input,
                                              lambda i, d: ranked.apply(keeps[i], d, a))
            out[a - first: b - first].copy_(merged.to(work))


    def _random_into(self, t: TensorPlan, entry: list, view: memoryview, start: int) -> None:
        """DARE and DELLA: each task vector's mask is drawn per block of a fixed grid from a generator seeded by
        (--seed, tensor, model, block), so any chunk can draw its part in any order; the L1 rescale factors are
        streamed first. DARE's grid is ranked.BLOCK elements; DELLA's is whole rows (it ranks |delta| within each
        row), as many as fit in ranked.BLOCK elements."""
        import torch

        from composer import ranked
        from composer.methods import streamed_task_arithmetic
        from composer.methods.sparsify import della_mask

        spec, others, shared, per_input = task_vector_parts(t)
        densities = [float(d) for d in per_input["density"]]
        rescale = bool({**spec.shared, **shared}["rescale"])
        della = t.op in DELLA
        width, grid = rows_grid(t, ranked.BLOCK) if della else (1, ranked.BLOCK)
        epsilons = [float(e) for e in per_input["epsilon"]] if della else []

        def deltas(a: int, b: int) -> list:
            base = read_block(t.inputs[t.base], t, self._sources, a, b)
            return [read_block(t.inputs[k], t, self._sources, a, b) - base for k in others]

        def masks(a: int, b: int, ds: list | None = None) -> list:
            """The masks of grid block [a, b) (DELLA's need that block's deltas)."""
            out = []
            for i, d in enumerate(densities):
                generator = torch.Generator().manual_seed(tensor_seed(self._seed, f"{t.name}:{i}:{a // grid}"))
                if d >= 1:
                    out.append(None)
                elif della:
                    ds = ds if ds is not None else deltas(a, b)
                    out.append(della_mask(ds[i].reshape(-1, width), d, epsilons[i], generator).reshape(-1))
                else:
                    out.append(torch.bernoulli(torch.full((b - a,), d), generator=generator))
            return out

        with entry[0]:
            if entry[1] is None:
                factors = [None] * len(others)
                if rescale and any(d < 1 for d in densities):
                    def norms(a: int, b: int) -> list:
                        ds = deltas(a, b)
                        return [(d.abs().sum(dtype=torch.float64), (d * m).abs().sum(dtype=torch.float64))
                                if m is not None else None for d, m in zip(ds, masks(a, b, ds))]

                    sums = [[0.0, 0.0] for _ in others]
                    for part in ranked.each(norms, [(a, min(t.numel, a + grid)) for a in range(0, t.numel, grid)]):
                        for acc, got in zip(sums, part):
                            if got is not None:
                                acc[0] += float(got[0])
                                acc[1] += float(got[1])
                    for i, (before, after) in enumerate(sums):
                        before, after = torch.tensor(before).float(), torch.tensor(after).float()
                        if densities[i] < 1 and before >= 1e-7 and after >= 1e-7:
                            factors[i] = before / after
                entry[1] = factors
            factors = entry[1]
        out, work, first, last = output_view(t, view, start)
        for ga in range(first - first % grid, last, grid):
            gb = min(t.numel, ga + grid)
            if della and any(d < 1 for d in densities):  # the masks read the whole block: keep it for the merge
                held = [read_block(t.inputs[k], t, self._sources, ga, gb) for k in [t.base, *others]]
                drawn = masks(ga, gb, [x - held[0] for x in held[1:]])
            else:
                held, drawn = None, masks(ga, gb)
            for a in range(max(ga, first), min(gb, last), CHUNK_ELEMENTS):
                b = min(gb, last, a + CHUNK_ELEMENTS)

                def sparsify(i: int, d, a=a):
                    if drawn[i] is None:
                        return d
                    masked = d * drawn[i][a - ga: a - ga + d.numel()]
                    return masked if factors[i] is None else masked * factors[i]

                if held is None:
                    base = read_block(t.inputs[t.base], t, self._sources, a, b)
                    xs = [read_block(t.inputs[k], t, self._sources, a, b) for k in others]
                else:
                    base, *xs = (x[a - ga: b - ga] for x in held)
                merged = streamed_task_arithmetic(t.op, base, xs, shared, per_input, sparsify)
                out[a - first: b - first].copy_(merged.to(work))
