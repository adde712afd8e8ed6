"""The Winograd 3x3 convolution equals the direct one, forward and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from cut import winograd
from cut.networks import BlockConv2d, ResnetBlock, ResnetGenerator


def assert_same_output_and_gradients(ours_fn, direct_fn, inputs: tuple[torch.Tensor, ...]) -> None:
    direct, ours = direct_fn(*inputs), ours_fn(*inputs)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(direct)
    want = torch.autograd.grad(direct, inputs, grad_out)
    got = torch.autograd.grad(ours, inputs, grad_out)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-11)


def _float64_conv_inputs(n: int, c: int, k: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    shapes = [(n, c, h, w), (k, c, 3, 3), (k,)]
    return tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)


@pytest.mark.parametrize(("n", "c", "k", "h", "w"), [(2, 3, 4, 6, 8), (1, 5, 2, 2, 2), (2, 16, 8, 10, 6)])
def test_winograd_conv_and_its_gradients_equal_conv2d(n, c, k, h, w):
    assert_same_output_and_gradients(winograd.conv3x3, F.conv2d, _float64_conv_inputs(n, c, k, h + 2, w + 2))


def test_winograd_conv_with_its_own_reflect_padding_equals_pad_then_conv2d():
    assert_same_output_and_gradients(
        lambda x, w, b: winograd.conv3x3(x, w, b, reflect_pad=True),
        lambda x, w, b: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, b),
        _float64_conv_inputs(2, 3, 5, 6, 4),
    )


@pytest.mark.parametrize("size", [24, 16])  # Winograd, direct convolution
def test_resnet_block_keeps_no_padded_copy_for_backward(monkeypatch, size):
    """The block saves its unpadded maps (which the ReLU keeps anyway), not padded copies."""
    torch.manual_seed(size)
    block = ResnetBlock(8)
    x = torch.randn(2, 8, size, size, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = block(x)
    assert saved and not any(t.shape[-2:] == (size + 2, size + 2) for t in saved)
    block.zero_grad()
    out.square().sum().backward()
    # Weights only: conv biases in front of an InstanceNorm have a zero true gradient (pure noise).
    weights = [p for p in block.parameters() if p.dim() > 1]
    grads = [p.grad.clone() for p in weights]
    block.zero_grad()
    monkeypatch.setattr(winograd, "MAX_PIXELS", 0)
    (x + block.conv_block(x)).square().sum().backward()  # the official pad modules and nn.Conv2d
    for got, want in zip(grads, (p.grad for p in weights), strict=True):
        # float32 sums in another order: compare against the gradient's scale (seen: 1e-6 of it)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_winograd_conv_without_bias_and_with_frozen_weights():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    weight = torch.randn(3, 4, 3, 3)
    out = winograd.conv3x3(x, weight)
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(F.conv2d(x, weight).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def test_fits_only_small_even_float32_cpu_maps():
    w = torch.zeros(2, 2, 3, 3)
    assert winograd.fits(torch.zeros(1, 2, 34, 34), w)
    assert not winograd.fits(torch.zeros(1, 2, 33, 34), w)  # odd output height
    assert not winograd.fits(torch.zeros(1, 2, 34, 34, dtype=torch.float64), w)
    side = int(winograd.MAX_PIXELS**0.5) + 2
    assert not winograd.fits(torch.zeros(1, 2, side + 2, side + 2), w)
    assert not winograd.fits(torch.zeros(1, 2, 34, 34), torch.zeros(2, 2, 5, 5))
    assert not winograd.fits(torch.zeros(1, 2, 18, 18), w)  # 16x16: below MIN_PIXELS


def test_block_conv_uses_winograd_only_when_training():
    conv = BlockConv2d(4)
    x = torch.randn(2, 4, 26, 26, requires_grad=True)
    assert conv(x).grad_fn.name().startswith("_WinogradConv3x3")
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias), rtol=0, atol=0)


def test_generator_trains_the_same_with_and_without_winograd(monkeypatch):
    torch.manual_seed(0)
    g = ResnetGenerator(ngf=8, n_blocks=2)
    x = torch.randn(2, 3, 96, 96)  # 24x24 maps in the ResNet blocks
    out = g(x)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in g.parameters()]
    g.zero_grad()
    monkeypatch.setattr(winograd, "MAX_PIXELS", 0)
    direct = g(x)
    direct.square().mean().backward()
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (p.grad for p in g.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
