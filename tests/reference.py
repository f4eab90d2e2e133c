"""Naive in-memory references: each depth operation written plainly over a whole state dict, as the papers do."""
from __future__ import annotations

import re

import torch

LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.(.+)$")


def split_layers(sd: dict[str, torch.Tensor]) -> tuple[str, dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    other, prefix = {}, None
    for name, t in sd.items():
        m = LAYER.match(name)
        if m:
            prefix = m.group(1)
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            other[name] = t
    return prefix, layers, other


def stack(pieces: list[tuple[dict[str, torch.Tensor], int]], first: dict, last: dict) -> dict[str, torch.Tensor]:
    """Output layers in order from (state dict, layer) pairs; embeddings from `first`, norm and head from `last`."""
    prefix, _, _ = split_layers(first)
    out = {n: t for n, t in split_layers(first)[2].items() if "embed" in n}
    for i, (sd, layer) in enumerate(pieces):
        for suffix, t in split_layers(sd)[1][layer].items():
            out[f"{prefix}.{i}.{suffix}"] = t
    out.update({n: t for n, t in split_layers(last)[2].items() if "embed" not in n})
    return out


def dus(sd: dict[str, torch.Tensor], ranges: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """SOLAR depth up-scaling: concatenate layer ranges [a, b) of one model."""
    return stack([(sd, i) for a, b in ranges for i in range(a, b)], sd, sd)


def llama_pro(ckpt: dict[str, torch.Tensor], original_layers: int, layers: int) -> dict[str, torch.Tensor]:
    """LLaMA Pro's scripts/block_expansion.py, rewritten: after every split-th layer, a copy with o_proj/down_proj zeroed."""
    split = int(original_layers / (layers - original_layers))
    layer_cnt = 0
    output = {}
    for i in range(original_layers):
        for k in ckpt:
            if ("layers." + str(i) + ".") in k:
                output[k.replace("layers." + str(i) + ".", "layers." + str(layer_cnt) + ".")] = ckpt[k]
        layer_cnt += 1
        if (i + 1) % split == 0:
            for k in ckpt:
                if ("layers." + str(i) + ".") in k:
                    new = k.replace("layers." + str(i) + ".", "layers." + str(layer_cnt) + ".")
                    output[new] = torch.zeros_like(ckpt[k]) if ("down_proj" in k or "o_proj" in k) else ckpt[k]
            layer_cnt += 1
    assert layer_cnt == layers
    for k in ckpt:
        if "layers" not in k:
            output[k] = ckpt[k]
    return output


def interleave(sds: list[dict[str, torch.Tensor]], n: int, window: int, overlap: int) -> dict[str, torch.Tensor]:
    """Windows of `window` layers starting every window - overlap, taken from each model in turn."""
    starts = list(range(0, n - window + 1, window - overlap))
    pieces = [(sds[k % len(sds)], s + i) for k, s in enumerate(starts) for i in range(window)]
    return stack(pieces, sds[0], sds[(len(starts) - 1) % len(sds)])


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert torch.equal(a, e), name
