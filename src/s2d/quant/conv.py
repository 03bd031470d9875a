"""QuantPatchConv: a vision transformer's patch embedding (a Conv2d whose kernel equals its stride) with a
fake-quantized weight and, optionally, input.

Such a convolution is a Linear on the flattened non-overlapping patches::

    out[b, :, i, j] = W₂ · patch(b, i, j) + bias,   W₂ = weight.reshape(out, C·kh·kw)

with patch(b, i, j) the (C, kh, kw) block of the image flattened in the same order (:func:`patch_rows`),
so the PTQ methods treat it as a Linear with inputs (B·P, C·kh·kw) and outputs (B·P, out). The official
PTQ4ViT, RepQ-ViT and ERQ pipelines all quantize its weight at W bits per output channel; RepQ-ViT also
quantizes its input (the image) at 8 bits.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["is_patch_conv", "patch_rows", "output_rows", "QuantPatchConv"]


def is_patch_conv(m: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` that cuts its input into non-overlapping patches: kernel == stride, no
    padding, no dilation, one group."""
    return (type(m) is nn.Conv2d and tuple(m.kernel_size) == tuple(m.stride) and m.padding in ((0, 0), "valid")
            and tuple(m.dilation) == (1, 1) and m.groups == 1)


def patch_rows(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input image(s) x (B, C, H, W) as patch rows (B·P, C·kh·kw), P = (H // kh)·(W // kw), in the
    order of the convolution's output positions (row-major) and of ``weight.reshape(out, -1)``'s columns."""
    cols = F.unfold(x, conv.kernel_size, stride=conv.stride)  # (B, C·kh·kw, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_rows(y: Tensor) -> Tensor:
    """A convolution output (B, out, h, w) as rows (B·h·w, out), matching :func:`patch_rows`."""
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


class QuantPatchConv(nn.Conv2d):
    """A patch-embedding ``nn.Conv2d`` whose weight (and input, when its quantizer is not an
    ``nn.Identity``) pass through fake quantizers. Same parameters, same name.

    Made from an existing convolution by :meth:`from_conv`, which swaps the instance's class in place
    (parameters, optimizer state and hooks are kept). The weight quantizer sees the 4-D weight; with
    granularity "channel" and axis 0 that is one range per output channel.
    """

    input_quantizer: nn.Module   # a Quantizer, or nn.Identity for a float input (the default)
    weight_quantizer: nn.Module  # a Quantizer

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_quantizer: nn.Module,
                  input_quantizer: nn.Module | None = None) -> QuantPatchConv:
        """Turn ``conv`` into a QuantPatchConv in place and return it."""
        if not (is_patch_conv(conv) or isinstance(conv, QuantPatchConv)):
            raise TypeError(f"QuantPatchConv.from_conv expects a patch Conv2d (kernel == stride, no padding), "
                            f"got {conv!r}")
        conv.__class__ = cls
        conv.weight_quantizer = weight_quantizer
        conv.input_quantizer = nn.Identity() if input_quantizer is None else input_quantizer
        return conv

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)

    def weight_2d(self) -> Tensor:
        """The weight as the equivalent Linear's, (out, C·kh·kw) (a view)."""
        return self.weight.reshape(self.out_channels, -1)
