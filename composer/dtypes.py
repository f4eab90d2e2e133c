"""Dtype names: safetensors' codes, the recipe's names, bytes per element, and the matching torch dtypes."""
from __future__ import annotations

ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
DTYPE_NAME = {v: k for k, v in ST_DTYPE.items()}
FLOAT_DTYPES = tuple(ST_DTYPE.values())


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code (torch is imported on first use: planning needs none)."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]
