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

