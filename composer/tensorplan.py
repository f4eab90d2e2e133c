"""What a plan is made of: Plan, TensorPlan (one output tensor: op, inputs, parameters, dtype), LayerPlan, how
each merged tensor is computed (merge_mode, from composer.merging), and the chunk sizes that the planner, the dry run and the writer
share. Plain data: building it is composer.plan's work."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from composer.dtypes import ITEMSIZE
from composer.recipe import Recipe
from composer.sources import Derived, SourceModel, TensorInfo
from composer.writer import ShardPlan

DEFAULT_SHARD_SIZE = 5_000_000_000
CHUNK_ELEMENTS = 256 * 1024  # elements per compute step: float32 temporaries stay in L2 cache and in malloc's heap
RANK_BLOCK = 2**20  # elements per step of the statistics passes (composer.ranked.BLOCK)
CHUNK_BYTES = 64 * 2**20  # one output chunk: the unit of reading, computing and writing
WORKERS = 2  # chunks in flight: keeps the disk busy while another chunk is read or computed
# Chunk buffers beyond one per worker: a worker hands its filled chunk to a writer thread and fills the next one
# meanwhile, so up to WORKERS + SPARE_CHUNKS writes can be in flight (direct writes here, a virtual disk, ran at
# ~460 MB/s with one 64 MB write in flight and ~700 with two; dd, the rate varies with the neighbours' load).
SPARE_CHUNKS = 1


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: what op makes it, from which source tensors, with which parameters, in which dtype."""

    name: str
    op: str  # "copy" | "zeros" | "scale", or a merge method ("linear", "slerp", ...)
    inputs: tuple[TensorInfo, ...]
    models: tuple[str, ...]
    dtype: str
    via: str | None = None  # the recipe's `dtype`: values are rounded through it first, as mergekit does
    params: tuple[tuple[str, Any], ...] = ()  # shared parameters, resolved for this tensor
    input_params: tuple[tuple[tuple[str, Any], ...], ...] = ()  # per input (merges), resolved for this tensor
    base: int | None = None  # index in `inputs` of the base model's tensor (merges)
    layer: int | None = None
    source_layer: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inputs[0].shape

    @property
    def numel(self) -> int:
        return self.inputs[0].numel

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_byte_copy(self) -> bool:
        src = self.inputs[0].dtype
        derived = isinstance(self.inputs[0], Derived)  # re-indexed rows, a merged adapter: computed, not copied
        return self.op == "copy" and src == self.dtype and self.via in (None, src) and not derived

    @property
    def is_merge(self) -> bool:
        return self.op not in ("copy", "zeros", "scale")

    @property
    def is_computed(self) -> bool:
        """Made by arithmetic on values (torch), not by copying bytes or writing zeros."""
        return not (self.is_byte_copy or self.op == "zeros")

    @property
    def status(self) -> str:
        if self.is_merge:
            return "merged"
        if self.op == "zeros" or (self.op == "scale" and dict(self.params).get("scale") == 0):
            return "zeroed"
        if self.op == "scale":
            return "scaled"
        derived = getattr(self.inputs[0], "status", None)  # an adapted, stacked or router stand-in says what it is
        if isinstance(derived, str):
            return derived
        return "copied" if self.is_byte_copy else "converted"


def merge_mode(t: TensorPlan) -> str:
    """The streaming shape a merged tensor is computed with (composer.merging.merge_mode)."""
    from composer.merging import merge_mode as mode

    return mode(t)


@dataclass(frozen=True)
class LayerPlan:
    """One output layer: which model and layer it comes from, and whether it is new (an identity block)."""

    index: int
    model: str
    source_layer: int
    status: str  # "copied" | "new" | "scaled" | "merged"
    zeroed: tuple[str, ...] = ()
    sources: tuple[tuple[str, int], ...] = ()  # every (model, layer) the layer is made from


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    operation: str
    base: str
    tokenizer_from: str
    sources: Mapping[str, SourceModel]
    tensors: tuple[TensorPlan, ...]
    layers: tuple[LayerPlan, ...]
    config: Mapping[str, Any]
    shards: tuple[ShardPlan, ...]
    recipe_text: str = ""
    recipe_path: str = ""
    notes: tuple[str, ...] = field(default=())
    seed: int = 0  # seeds the random merge methods (DARE, DELLA), per tensor
    stages: tuple[tuple[str, str], ...] = ()  # a multi-document recipe's earlier stages: (name, operation)
    tokenizer: Any = field(default=None, compare=False)  # a composer.tokenizer.OutputTokenizer, or None: copy the files
    prepare: Any = field(default=None, compare=False)  # run before any weight is written (an MoE's gate vectors)
    copy_tokenizer: bool = True  # write the tokenizer files (compose --no-copy-tokenizer: none, as in mergekit)
    write_card: bool = True  # write README.md, the model card (--no-write-model-card; the provenance files stay)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def computes(self) -> bool:
        """Whether any tensor is computed rather than copied as bytes or zero-filled: only then is torch needed."""
        return any(t.is_computed for t in self.tensors)

    @property
    def compute_memory(self) -> int:
        """Scratch memory one worker needs to compute (not copy) a chunk: a float32 copy and the cast result."""
        worst = 0
        for t in self.tensors:
            if t.is_merge:  # every input and the result in float32, then the output: for a block or the whole
                from composer.merging import held_elements

                block = held_elements(t)
                worst = max(worst, block * (4 * (len(t.inputs) + 2) + ITEMSIZE[t.dtype]))
            elif t.is_computed:
                worst = max(worst, min(t.numel, CHUNK_ELEMENTS) * (ITEMSIZE[t.dtype] + 2 * 4))
        return worst
