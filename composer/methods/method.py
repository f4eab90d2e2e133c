"""What a merge method is: one object owning its name, paper, parameters (scope, default, type, range), input
contract, plan-time checks, whole-tensor formula and streamed decomposition. The recipe schema, the planner, the
merge engine, `--dry-run`, the card and the README table all read these objects; none spells a method's name."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from composer.tensorplan import TensorPlan

REQUIRED = object()  # a Param default: the recipe must set it


@dataclass(frozen=True)
class Param:
    """One parameter as mergekit names it. `per_input`: given per input model (the non-base ones, unless the
    method's weights include the base), else shared (resolved on the output tensor's name). `low`/`high` bound
    the values that mean something (None: unbounded); `open_low`/`open_high` exclude the bound itself."""

    name: str
    default: Any = REQUIRED
    per_input: bool = False
    kind: str = "number"  # "number", "integer" or "bool"
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    why: str = ""  # what the range means, for the refusal
    unused: bool = False  # accepted, as mergekit accepts it, and ignored, as it ignores it (the plan says so)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def range_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"

    def type_error(self, value: Any) -> str | None:
        """Why `value` is not of this parameter's type, or None."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else "it must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "it must be a number"
        if self.kind == "integer" and value != int(value):
            return "it must be a whole number"
        return None

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or self.open_low and value == self.low):
            return False
        return not (self.high is not None and (value > self.high or self.open_high and value == self.high))

    def describe(self) -> str:
        """For the README table: `name` (default), or `name` alone when required."""
        if self.required:
            return f"`{self.name}`"
        default = str(self.default).lower() if isinstance(self.default, bool) else f"{self.default:g}"
        return f"`{self.name}` ({default})"


@dataclass(frozen=True)
class Streaming:
    """How a method is computed without holding a tensor whole.

    `prepare(job)` runs once per tensor: streamed statistics passes (norms, dot products, magnitude cuts, rescale
    factors), whose result is handed to every `blend`. `blend(job, stats, a, b)` returns the float32 output
    elements [a, b). `grid(job)` is the size of the blocks blend needs whole (1: any block, which the engine
    cuts into steps of job.chunk elements; whole rows, for methods that work per row); blocks start at multiples
    of it. A method with no Streaming is computed whole: correct, only slower."""

    name: str  # the shape, for `--dry-run` and tests: "elementwise", "statistics", "ranked", "rows", ...
    blend: Callable[[MergeJob, Any, int, int], Tensor]
    prepare: Callable[[MergeJob], Any] | None = None
    grid: Callable[[MergeJob], int] = lambda job: 1


def weights_sum(job: MergeJob) -> str | None:
    """The plan-time check of methods that normalize by the sum of their weights."""
    weights = job.per_input.get("weight", ())
    if weights and job.shared.get("normalize") and sum(weights) == 0:
        return "the weights sum to 0, so normalize cannot divide by them: change a weight or set normalize: false"
    return None


def formula_blend(job: MergeJob, stats: Any, a: int, b: int) -> Tensor:
    """The whole-tensor formula on a block: right for methods whose arithmetic is elementwise."""
    return job.method.compute(job, job.read_base(a, b), job.read_inputs(a, b))


def rows_blend(job: MergeJob, stats: Any, a: int, b: int) -> Tensor:
    """The whole-tensor formula on a block of whole rows: right for methods that work row by row (along the last
    dimension)."""
    width, _ = job.rows(job.block)
    shape = (-1, width) if len(job.shape) == 2 else (-1,)
    base = job.read_base(a, b)
    return job.method.compute(job, None if base is None else base.reshape(shape),
                              [x.reshape(shape) for x in job.read_inputs(a, b)]).reshape(-1)


ELEMENTWISE = Streaming("elementwise", formula_blend)
ROWS = Streaming("rows", rows_blend, grid=lambda job: job.rows(job.block)[1])


@dataclass(frozen=True)
class MergeMethod:
    """One merge method. `formula(base, tensors, shared, per_input, generator)` is its arithmetic on whole float32
    tensors (base None when it takes none; per_input values are lists aligned with `tensors`). `streaming(job)`
    picks its streamed decomposition for one tensor's parameters (None: whole tensor). `check(job)` returns a
    plan-time problem with the parameters beyond their ranges (a message), or None."""

    name: str
    title: str  # the paper or reference mergekit names
    url: str
    summary: str  # one line for the card and the README: what it computes
    params: tuple[Param, ...]
    formula: Callable[..., Tensor]
    base: str = "required"  # "required", "optional" or "ignored" (a base model is then an ordinary input)
    min_inputs: int = 1  # inputs, base included
    max_inputs: int | None = None
    min_others: int = 0  # inputs besides the base
    max_others: int | None = None
    random: bool = False  # draws random numbers: seeded by --seed and the tensor's name
    consensus: bool = False  # task-vector methods: TIES' sign election
    streaming: Callable[[MergeJob], Streaming | None] | None = None
    check: Callable[[MergeJob], str | None] | None = None
    notes: str = ""  # how it differs from mergekit, if at all: the README's text

    @property
    def shared(self) -> dict[str, Any]:
        return {p.name: None if p.required else p.default for p in self.params if not p.per_input}

    @property
    def per_input(self) -> dict[str, Any]:
        return {p.name: None if p.required else p.default for p in self.params if p.per_input}

    @property
    def parameters(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def compute(self, job: MergeJob, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        """The formula on loaded inputs of a job (whole tensors, or a block of an elementwise method)."""
        generator = job.generator() if self.random else None
        return self.formula(base, list(tensors), dict(job.shared), dict(job.per_input), generator)

    def apply(
        self,
        tensors: Sequence[Tensor],
        *,
        base: Tensor | None = None,
        shared: Mapping[str, Any] | None = None,
        per_input: Mapping[str, Sequence[Any]] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The formula with mergekit-named parameters, defaults filled in: for tests and library users. `tensors`
        excludes the base (a method whose base is ignored takes every input here)."""
        shared, per_input = dict(shared or {}), dict(per_input or {})
        for scope, given, allowed in (("shared", shared, self.shared), ("per-input", per_input, self.per_input)):
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"{self.name} has no {scope} parameter(s) {unknown}")
        missing = [p.name for p in self.params if p.required and p.name not in shared and p.name not in per_input]
        if missing:
            raise ValueError(f"{self.name} requires {missing}")
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} requires a base tensor")
        if self.base == "ignored" and base is not None:
            raise ValueError(f"{self.name} has no base: pass every input in tensors")
        if self.random and generator is None:
            raise ValueError(f"{self.name} is random: pass a torch.Generator")
        shared = {k: shared.get(k, v) for k, v in self.shared.items()}
        per_input = {k: list(per_input[k]) if k in per_input else [v] * len(tensors) for k, v in self.per_input.items()}
        return self.formula(base, list(tensors), shared, per_input, generator)

    def contract_text(self) -> str:
        """The input contract in words, for the README table and errors."""
        parts = {"required": "required", "optional": "optional", "ignored": "none"}[self.base]
        if self.max_others is not None and self.max_others == self.min_others:
            parts += f", {self.min_others} other{'s' if self.min_others != 1 else ''}"
        elif self.min_others > 1:
            parts += f", {self.min_others}+ others"
        if self.max_inputs is not None and self.max_inputs == self.min_inputs:
            parts += f", {self.min_inputs} models"
        return parts


@dataclass(frozen=True)
class MergeJob:
    """One merged tensor as its method sees it: the tensor plan, its parameters with defaults filled (per-input
    ones as lists over the method's inputs), where the base and the other inputs sit among the tensor's inputs,
    and, while executing, the open sources to read blocks from. `chunk` and `block` are the engine's step sizes
    (elements per elementwise step, and per step of a statistics pass)."""

    tensor: TensorPlan
    method: MergeMethod
    shared: Mapping[str, Any]
    per_input: Mapping[str, tuple]
    base: int | None
    inputs: tuple[int, ...]
    seed: int = 0
    sources: Any = None
    chunk: int = 256 * 1024
    block: int = 2**20

    @classmethod
    def of(cls, t: TensorPlan, method: MergeMethod, seed: int = 0, sources: Any = None, *, chunk: int | None = None,
           block: int | None = None) -> MergeJob:
        from composer.tensorplan import CHUNK_ELEMENTS, RANK_BLOCK

        base = t.base if method.base != "ignored" else None
        inputs = tuple(k for k in range(len(t.inputs)) if k != base)
        per_input = {p.name: tuple(dict(t.input_params[k])[p.name] for k in inputs) for p in method.params
                     if p.per_input}
        shared = {**method.shared, **dict(t.params)}
        return cls(t, method, shared, per_input, base, inputs, seed, sources,
                   chunk or CHUNK_ELEMENTS, block or RANK_BLOCK)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def numel(self) -> int:
        return self.tensor.numel

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def models(self) -> tuple[str, ...]:
        """The models of the method's inputs (the base excluded where it has one)."""
        return tuple(self.tensor.models[k] for k in self.inputs)

    @property
    def stream(self) -> Streaming | None:
        return self.method.streaming(self) if self.method.streaming else None

    def read(self, k: int, a: int = 0, b: int | None = None, out=None) -> Tensor:
        """float32 elements [a, b) of the tensor's input k, flat, rounded through the recipe's dtype (into `out`,
        a float32 buffer, when given)."""
        from composer.blocks import read_block

        return read_block(self.tensor.inputs[k], self.tensor, self.sources, a, b, out)

    def read_base(self, a: int = 0, b: int | None = None, out=None) -> Tensor | None:
        return None if self.base is None else self.read(self.base, a, b, out)

    def read_raw(self, k: int, a: int = 0, b: int | None = None) -> Tensor:
        """Elements [a, b) of input k for the native kernels: where `read` would only convert them to float32 (a
        file's bfloat16 or float32 tensor, read in its own dtype), the mapped file's elements themselves, which
        the kernels convert as they load them (the same values; float32 ones are `read`'s own result); else
        `read`'s float32. `.float()` of it is `read`'s result either way."""
        from composer.blocks import raw_block

        return raw_block(self.tensor.inputs[k], self.tensor, self.sources, a, b)

    def read_raw_all(self, a: int, b: int) -> tuple[Tensor | None, list[Tensor]]:
        """(base, inputs) of elements [a, b), as read_raw gives them."""
        base = None if self.base is None else self.read_raw(self.base, a, b)
        return base, [self.read_raw(k, a, b) for k in self.inputs]

    def read_inputs(self, a: int = 0, b: int | None = None) -> list[Tensor]:
        return [self.read(k, a, b) for k in self.inputs]

    def deltas(self, a: int, b: int) -> list[Tensor]:
        """The task vectors (input - base) of elements [a, b)."""
        base = self.read_base(a, b)
        return [x - base for x in self.read_inputs(a, b)]

    def steps(self, grid: int | None = None) -> list[tuple[int, int]]:
        """The tensor's elements in blocks of `grid` (default: a statistics pass's step, job.block)."""
        grid = grid or self.block
        return [(a, min(self.numel, a + grid)) for a in range(0, self.numel, grid)]

    def each(self, fn: Callable[[int, int], Any], steps: list[tuple[int, int]]):
        """fn over the steps on the engine's pass threads, results in step order (composer.ranked.each)."""
        from composer import ranked

        return ranked.each(fn, steps)

    def generator(self, key: str = "") -> torch.Generator:
        """A generator seeded by --seed, the tensor's name and `key`: random methods give the same tensor whatever
        order the chunks run in."""
        import torch

        from composer.blocks import tensor_seed

        return torch.Generator().manual_seed(tensor_seed(self.seed, f"{self.name}:{key}" if key else self.name))

    def rows(self, elements: int, width: int | None = None) -> tuple[int, int]:
        """(row width, grid step): as many whole rows as fit in `elements` (a 1-D tensor is one row unless
        `width` says otherwise)."""
        width = (self.shape[-1] if len(self.shape) == 2 else self.numel) if width is None else width
        return width, width * max(1, elements // width)


_LOCAL = threading.local()


def scratch(key: str, rows: int, n: int) -> Tensor:
    """A float32 [rows, n] work buffer kept by the calling thread for its life: a fresh temporary per block cost
    ~8x the arithmetic (allocation, page faults, one more pass over memory)."""
    import torch

    held = getattr(_LOCAL, key, None)
    if held is None or held.shape[0] != rows or held.shape[1] < n:
        held = torch.empty(rows, max(n, 256 * 1024))
        setattr(_LOCAL, key, held)
    return held[:, :n]
