"""What every merge method shares: torch imported on first use, the float32 conversion and shape check, and
per-input parameter lists."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from torch import Tensor


class LazyTorch:
    """torch, imported on first use: planning reads the method specs without paying torch's ~3 s import, so
    `--dry-run` answers at once; the functions import it when they first run. The first attribute read puts the
    module itself into the namespace given, so later lookups go straight to it."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._namespace = namespace

    def __getattr__(self, name: str):
        import torch as module

        self._namespace["torch"] = module
        return getattr(module, name)


# Notes that hold for every function below (checked against mergekit 0.1.5, merge_methods/ and sparsify.py):
# - Inputs are converted to float32 (a no-op for float32) and the result is float32. mergekit's linear and slerp
#   also work in float32; its task-arithmetic family, nuslerp and model_stock work in the inputs' own dtype, so
#   they agree with these functions bit for bit when mergekit loads in float32 (`dtype: float32`).
# - All inputs of one merge must have one shape, or ValueError. mergekit raises ValueError too ("Tensor size
#   mismatch"); it never pads or truncates inside a method. Vocabulary-sized tensors are aligned beforehand by
#   its tokenizer step, or truncated to the shortest row count by --unsafe-truncate-embeddings.
# - Input order matters to the last bit (sums run in model order), as in mergekit: pass models in recipe order.
# - Locality, for streaming in row blocks (blocks along dim 0): "elementwise" methods may be computed on any row
#   block independently (random ones need the generator consumed in row-major order: a mask draws one uniform
#   number per element, in order); "rows" methods need whole rows; "tensor" methods need whole-tensor statistics.
#   See locality().


def float32(tensors: Sequence[Tensor]) -> list[Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("at least one tensor is required")
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError(f"tensor shapes differ: {shapes}")
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError("merging requires floating-point tensors")
    import torch

    return [t.to(torch.float32) for t in tensors]


def per_input(name: str, values: Sequence[float] | None, n: int, default: float | None) -> list[float]:
    if values is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return [float(default)] * n
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(values)}")
    return values



def add_l1_lanes(v: Tensor, m: Tensor, lanes: Tensor) -> None:
    """Add |v| and |v| * m (float32; m a 0/1 mask) to the float64 `lanes` [2, LANES] (composer.native.LANES):
    element j into lane j % LANES, each lane summed in index order (v's first element is lane 0: a run of several
    calls must give each one a multiple of LANES elements until the last). A sum in this fixed order, natively
    (composer.native.lane_sums) or here in torch, gives the same bits, which torch's own sum (its order depends on
    its build and the tensor's size) would not; l1_total adds the lanes up. DARE's and DELLA's L1 rescale."""
    import torch

    from composer import native

    if native.lane_sums(v.reshape(-1), m.reshape(-1), lanes):
        return
    magnitude = v.reshape(-1).abs()
    for row, values in zip(lanes, (magnitude, magnitude * m.reshape(-1))):
        values = torch.nn.functional.pad(values.double(), (0, -values.numel() % native.LANES))
        row.copy_(torch.cat([row[None], values.view(-1, native.LANES)]).cumsum(0)[-1])  # cumsum: in index order


def lane_totals(lanes: Tensor) -> list[float]:
    """Each row's sum of a fixed-order sum's float64 lanes (add_l1_lanes', averaging.add_angle_lanes',
    fusion.add_square_lanes'): the lanes added in lane order, in float64."""
    totals = []
    for row in lanes.tolist():
        total = 0.0
        for value in row:
            total += value
        totals.append(total)
    return totals


def l1_total(lanes: Tensor) -> list[float]:
    """The two sums of add_l1_lanes' lanes."""
    return lane_totals(lanes)


_SPREAD: list = []  # byte value -> the int64 whose 8 bytes are its 8 bits (0 or 1), lowest bit first


def pack_mask(mask: Tensor, out: Tensor | None = None) -> Tensor:
    """A float32 0/1 mask as bits, 8 elements a byte (element j is bit j % 8 of byte j // 8): 1/32 of its size.
    Masks drawn in a statistics pass are kept this way for the blend, instead of being drawn (or ranked) again.
    Into `out` (uint8, contiguous, ceil(numel / 8) bytes) when given."""
    import torch

    from composer import native

    packed = native.pack(mask.reshape(-1), out)
    if packed is not None:
        return packed
    u = mask.reshape(-1).to(torch.uint8)
    if u.numel() % 8:
        u = torch.cat([u, u.new_zeros(8 - u.numel() % 8)])
    # byte k of each int64 (0 or 1) lands in bit 56 + k of the product: the carries stay below bit 56
    packed = ((u.view(torch.int64) * 0x0102040810204080) >> 56).bitwise_and_(0xFF).to(torch.uint8)
    return packed if out is None else out.copy_(packed)


class PackedMasks:
    """The packed masks (pack_mask) a statistics pass keeps for its blend, one per grid block and model, in one
    buffer that the thread starting the pass allocates up front. Made as one small tensor per block on the pass
    threads instead, they stayed alive among those threads' freed temporaries and split malloc's free chunks, so
    the freed space no longer fitted the next block's temporaries: DELLA's heaps grew by ~1 GB over the pass of
    one 65M-element tensor (949 MB free in 1,544 pieces, measured with mallinfo2), handed back only by the trim
    after it."""

    def __init__(self, numel: int, grid: int, models: int) -> None:
        import torch

        self.grid = grid
        self.data = torch.empty((-(-numel // grid), models, -(-grid // 8)), dtype=torch.uint8)

    def slot(self, a: int, b: int, model: int) -> Tensor:
        """The bytes of grid block [a, b)'s mask of `model` (a contiguous view)."""
        return self.data[a // self.grid, model, : -(-(b - a) // 8)]

    def put(self, a: int, b: int, model: int, mask: Tensor) -> None:
        pack_mask(mask, self.slot(a, b, model))


def unpack_mask(packed: Tensor, start: int, stop: int) -> Tensor:
    """Elements [start, stop) of a packed mask, as float32 0/1."""
    import torch

    from composer import native

    unpacked = native.unpack(packed, start, stop)
    if unpacked is not None:
        return unpacked
    if not _SPREAD:
        bits = torch.arange(256, dtype=torch.int64)
        _SPREAD.append(sum(((bits >> k) & 1) << (8 * k) for k in range(8)))
    first, last = start // 8, (stop + 7) // 8
    spread = _SPREAD[0].index_select(0, packed[first:last].to(torch.int64)).view(torch.uint8)
    return spread[start - 8 * first: stop - 8 * first].to(torch.float32)
