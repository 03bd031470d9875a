"""The patch embedding is quantized as each official PTQ pipeline quantizes it (issue 14): weights at W bits
per output channel everywhere, the image input at 8 bits for RepQ-ViT only, ERQ's Wqer on the patches.
References: torch's own conv2d, a hand-quantized weight, the float model's output."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ptq_models import image_batches, tiny_vit
from s2d.quant import ERQConfig, PTQ4ViTConfig, QuantConfig, quantize_model
from s2d.quant.conv import QuantPatchConv, output_rows, patch_rows
from s2d.quant.primitives import quantize_dequantize
from s2d.quant.ptq.erq import erq_patch_conv
from s2d.quant.quantizers import Quantizer, UniformQuantizer


def _conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return model.vit.embeddings.patch_embeddings.projection


def test_patch_rows_are_the_convolution_as_a_linear():
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 18, 16)  # 18 rows: the last 2 are dropped by the conv and by the patches alike
    rows = patch_rows(x, conv) @ conv.weight.reshape(5, -1).T + conv.bias
    torch.testing.assert_close(rows, output_rows(conv(x)), atol=1e-5, rtol=1e-5)


def test_rtn_quantizes_the_patch_weight_per_channel_and_keeps_its_input_float():
    model = tiny_vit()
    ref = copy.deepcopy(_conv(model))
    quantize_model(model, QuantConfig(4, 4), method="rtn", calib=image_batches(), progress=False)
    conv = _conv(model)
    assert isinstance(conv, QuantPatchConv) and isinstance(conv.input_quantizer, torch.nn.Identity)
    w_hand = quantize_dequantize(ref.weight.detach(), 4, True, axis=0)  # symmetric per output channel
    x = image_batches()[0]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, w_hand, ref.bias, stride=4), atol=1e-5, rtol=1e-5)
    float_model = tiny_vit()
    quantize_model(float_model, QuantConfig(4, 4, quantize_patch_embed=False), method="rtn", calib=image_batches(),
                   progress=False)
    assert type(_conv(float_model)) is torch.nn.Conv2d


def test_repq_quantizes_the_image_at_8_bits_and_erq_leaves_it_float():
    model = tiny_vit()
    quantize_model(model, QuantConfig(4, 4), method="repq", calib=image_batches(), progress=False)
    iq, wq = _conv(model).input_quantizer, _conv(model).weight_quantizer
    assert isinstance(iq, UniformQuantizer) and iq.bits == 8 and iq.calibrated and iq.enabled
    assert (wq.bits, wq.granularity, wq.symmetric, wq.scale.numel()) == (4, "channel", False, 32)
    erq_model = tiny_vit()
    quantize_model(erq_model, QuantConfig(4, 4), method="erq", calib=image_batches(), progress=False)
    assert not isinstance(_conv(erq_model).input_quantizer, Quantizer)


def test_erq_wqer_on_patches_lowers_the_output_error_and_stays_on_the_grid():
    """Against the same weight grid rounded to nearest, on the conv's own output (torch conv2d). Smooth
    images: neighbouring pixels are correlated, as in real ones, which is what the compensation uses."""
    model = tiny_vit()
    quantize_model(model, QuantConfig(3, 8), method="rtn", calib=image_batches(), progress=False)
    conv = _conv(model)
    conv.weight_quantizer = UniformQuantizer(3, False, "channel", axis=0, include_zero=False)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.randn(32, 3, 6, 6, generator=g), size=16, mode="bilinear", align_corners=False)
    erq_patch_conv(conv, patch_rows(x, conv), ERQConfig(patch_wqer_lambda=1.0))  # λ for 512 patch rows
    wq = conv.weight_quantizer
    codes = conv.weight.reshape(32, -1) / wq.scale[:, None] + wq.zero_point[:, None]
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    with torch.no_grad():
        y = F.conv2d(x, w0, b0, stride=4)
        err_erq = float((conv(x) - y).pow(2).mean())
        err_rtn = float((F.conv2d(x, wq(w0), b0, stride=4) - y).pow(2).mean())
    assert err_erq < 0.8 * err_rtn  # no rounding refinement here (as the official conv path): ~0.6x


def test_ptq4vit_searches_the_patch_weight_per_channel_on_full_codes():
    model = tiny_vit()
    quantize_model(model, QuantConfig(4, 4), method="ptq4vit", calib=image_batches(),
                   config=PTQ4ViTConfig(n_candidates=8, rounds=1), progress=False)
    conv = _conv(model)
    wq = conv.weight_quantizer
    assert (wq.granularity, wq.symmetric, wq.qmin, wq.qmax, wq.scale.numel()) == ("channel", True, -8, 7, 32)
    codes = wq(conv.weight.detach()).reshape(32, -1) / wq.scale[:, None]
    torch.testing.assert_close(codes, codes.round().clamp(-8, 7), atol=1e-4, rtol=0)
    init = conv.weight.detach().reshape(32, -1).abs().amax(1) / 7.5
    assert not torch.allclose(wq.scale, init)  # the search moved at least one channel's step


@pytest.mark.parametrize("method", ["rtn", "repq", "erq", "ptq4vit"])
def test_every_method_quantizes_the_patch_embedding(method):
    """The deployed weight Q(W) differs from the float weight (ERQ also moves W itself onto the grid)."""
    model = tiny_vit()
    w_float = _conv(model).weight.detach().clone()
    cfg = PTQ4ViTConfig(n_candidates=4, rounds=1) if method == "ptq4vit" else None
    quantize_model(model, QuantConfig(4, 4), method=method, calib=image_batches(), config=cfg, progress=False)
    conv = _conv(model)
    assert isinstance(conv, QuantPatchConv) and conv.weight_quantizer.enabled and conv.weight_quantizer.calibrated
    with torch.no_grad():
        deployed = conv.weight_quantizer(conv.weight)
    assert len(torch.unique(deployed[0])) <= 16 < len(torch.unique(w_float[0]))


def test_erq_patch_conv_without_bias():
    """CLIP's patch embedding has no bias: Wqer then compensates the weight columns only."""
    conv = QuantPatchConv.from_conv(torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False),
                                    UniformQuantizer(4, False, "channel", axis=0, include_zero=False))
    x = F.interpolate(torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(2)), size=16, mode="bilinear")
    erq_patch_conv(conv, patch_rows(x, conv), ERQConfig(patch_wqer_lambda=1.0))
    assert conv.bias is None
    wq = conv.weight_quantizer
    codes = conv.weight.reshape(8, -1) / wq.scale[:, None] + wq.zero_point[:, None]
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
