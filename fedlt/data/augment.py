"""Batched image transforms in torch (no torchvision): uint8 NHWC -> normalised float NCHW, random crop with
zero padding and horizontal flip, all on whole batches with an explicit generator (reproducible per client)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_float(images_nhwc_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 N,H,W,C -> float32 N,C,H,W normalised with per-channel mean/std."""
    x = images_nhwc_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip for a batch, one independent draw per image.
    Padding is applied to the normalised tensor with zeros, i.e. like padding the raw image with the mean."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n,h
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n,w
        idx_n = torch.arange(n).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        if flip.any():
            x = x.clone()
            x[flip] = x[flip].flip(-1)
    return x.contiguous()
