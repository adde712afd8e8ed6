"""The Winograd 3x3 convolution equals the direct one, forward and both gradients."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cut import CUTConfig, CUTModel
from cut.fast import accelerate, native, winograd
from cut.fast.conv import WinogradConv2d
from cut.networks import ResnetBlock, ResnetGenerator

PAD = {"none": lambda x: x, "reflect": lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"),
       "zeros": lambda x: F.pad(x, (1, 1, 1, 1))}


def assert_same_output_and_gradients(ours_fn, direct_fn, inputs: tuple[torch.Tensor, ...]) -> None:
    direct, ours = direct_fn(*inputs), ours_fn(*inputs)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(direct)
    want = torch.autograd.grad(direct, inputs, grad_out)
    got = torch.autograd.grad(ours, inputs, grad_out)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-11)


def _float64_conv_inputs(n: int, c: int, k: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(n * 1000 + c * 100 + k * 10 + h + w)
    shapes = [(n, c, h, w), (k, c, 3, 3), (k,)]
    return tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("padding", ["none", "reflect", "zeros"])
@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w"), [(2, 3, 4, 6, 8), (1, 5, 2, 2, 2), (2, 16, 8, 10, 6), (2, 4, 6, 11, 7)]
)
def test_winograd_conv_and_its_gradients_equal_pad_then_conv2d(tile, padding, n, c, k, h, w):
    """Both tile sizes, whole and partial tiles (11x7: the map is extended with zeros)."""
    if padding == "none":
        h, w = h + 2, w + 2
    assert_same_output_and_gradients(
        lambda x, wt, b: winograd.conv2d(x, wt, b, padding, tile),
        lambda x, wt, b: F.conv2d(PAD[padding](x), wt, b),
        _float64_conv_inputs(n, c, k, h, w),
    )


@pytest.mark.parametrize("padding", ["none", "zeros"])
@pytest.mark.parametrize(("n", "c", "k", "h", "w"), [(2, 3, 4, 7, 9), (1, 5, 2, 4, 4), (2, 8, 6, 16, 12)])
def test_winograd_4x4_kernel_and_its_gradients_equal_conv2d(padding, n, c, k, h, w):
    """The discriminator's 4x4 kernels with padding 1: odd outputs (15x11), partial tiles."""
    x, weight, bias = _float64_conv_inputs(n, c, k, h, w)
    weight = torch.randn(k, c, 4, 4, dtype=torch.float64, requires_grad=True)
    assert_same_output_and_gradients(
        lambda x, wt, b: winograd.conv2d(x, wt, b, padding),
        lambda x, wt, b: F.conv2d(PAD[padding](x), wt, b),
        (x, weight, bias),
    )


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_a_map_in_several_bands_equals_one_band(monkeypatch, tile, padding):
    """Bands of 2 tile rows over 14 output rows: 7 rows of 2x2 tiles in bands [0,2) .. [4,6) and
    a last band of one; 4 rows of 4x4 tiles (the last one partial) in two bands.
    """
    positions, tiles_per_row = (tile + 2) ** 2, 2 * -(-10 // tile)
    monkeypatch.setattr(winograd, "BAND_BYTES", positions * 6 * tiles_per_row * 8 * 2)
    want = [(0, 2), (2, 2), (4, 2), (6, 1)] if tile == 2 else [(0, 2), (2, 2)]
    assert winograd._bands(-(-14 // tile), tiles_per_row, positions * 6, 8) == want
    assert_same_output_and_gradients(
        lambda x, wt, b: winograd.conv2d(x, wt, b, padding, tile),
        lambda x, wt, b: F.conv2d(PAD[padding](x), wt, b),
        _float64_conv_inputs(2, 4, 6, 14, 10),
    )


@pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels")
@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_a_forward_without_autograd_runs_a_small_map_as_one_band_with_the_same_output(monkeypatch, padding):
    x, weight = torch.randn(2, 8, 21, 19), torch.randn(8, 8, 3, 3)

    def bands(whole_map_bytes: int) -> list[tuple[int, int]]:
        return winograd._Plan(x, weight, winograd.PADDING[padding], 4, whole_map_bytes).bands

    monkeypatch.setattr(winograd, "BAND_BYTES", 36 * 8 * 2 * 5 * 4 * 2)  # two tile rows a band
    assert len(bands(0)) == 3 and bands(36 * 8 * 6 * 10 * 4) == [(0, 6)]
    with torch.no_grad():
        monkeypatch.setattr(winograd, "WHOLE_MAP_BYTES", 0)
        banded = winograd.conv2d(x, weight, None, padding, 4)
        monkeypatch.setattr(winograd, "WHOLE_MAP_BYTES", 16 << 20)
        whole = winograd.conv2d(x, weight, None, padding, 4)
    assert torch.equal(whole, banded)
    torch.testing.assert_close(whole, F.conv2d(PAD[padding](x), weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [24, 16])
def test_resnet_block_keeps_no_padded_copy_for_backward(monkeypatch, size):
    """The block saves its unpadded maps (which the ReLU keeps anyway), not padded copies."""
    torch.manual_seed(size)
    block = accelerate(ResnetBlock(8))
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
    monkeypatch.setattr(winograd, "MIN_PIXELS", 10**9)
    (x + block.conv_block(x)).square().sum().backward()  # the official pad modules and nn.Conv2d
    for got, want in zip(grads, (p.grad for p in weights), strict=True):
        # float32 sums in another order: compare against the gradient's scale (seen: 1e-6 of it)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_winograd_conv_without_bias_and_with_frozen_weights():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    weight = torch.randn(3, 4, 3, 3)
    out = winograd.conv2d(x, weight)
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(F.conv2d(x, weight).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def test_fits_only_float32_cpu_maps():
    w = torch.zeros(2, 2, 3, 3)
    assert winograd.fits(torch.zeros(1, 2, 34, 34), w)
    assert winograd.fits(torch.zeros(1, 2, 31, 32), w, "zeros")
    assert winograd.fits(torch.zeros(1, 2, 256, 256), w, "reflect")
    assert not winograd.fits(torch.zeros(1, 2, 34, 34, dtype=torch.float64), w)
    assert not winograd.fits(torch.zeros(1, 2, 34, 34), torch.zeros(2, 2, 5, 5))
    assert not winograd.fits(torch.zeros(1, 2, 8, 8), w)  # 6x6: below MIN_PIXELS


def test_output_tile_is_4_from_two_32x32_maps(monkeypatch):
    assert winograd.output_tile(1, 16, 16) == winograd.output_tile(1, 32, 32) == 2
    assert winograd.output_tile(2, 32, 32) == winograd.output_tile(1, 64, 64) == 4
    monkeypatch.setenv("CUT_WINOGRAD_TILE", "2")
    assert winograd.output_tile(1, 64, 64) == 2


def test_float32_error_of_4x4_tiles_stays_near_the_direct_convolutions():
    """256 channels, the ResNet blocks' width: both within 1e-5 of the output's scale."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 256, 12, 12), torch.randn(256, 256, 3, 3) * 0.02
    exact = F.conv2d(x.double(), w.double())
    scale = exact.abs().max()
    for tile in (2, 4):
        assert (winograd.conv2d(x, w, tile=tile).double() - exact).abs().max() <= 1e-5 * scale
    assert (F.conv2d(x, w).double() - exact).abs().max() <= 1e-5 * scale


def test_winograd_conv2d_module_runs_winograd_in_float32_and_nn_conv2d_under_autocast():
    torch.manual_seed(0)
    convs = (WinogradConv2d(4, 4), WinogradConv2d(4, 6, padding=1), WinogradConv2d(4, 6, 4, padding=1))
    for conv, size in zip(convs, (26, 24, 24), strict=True):
        x = torch.randn(2, 4, size, size, requires_grad=True)
        assert conv(x).grad_fn.name() == "_WinogradConv2dBackward"
        want = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).grad_fn.name() == "ConvolutionBackward0"


def test_generator_trains_the_same_with_and_without_winograd(monkeypatch):
    """With 2x2 tiles: the 4x4 tiles' larger rounding is checked per convolution above; through a
    whole generator's norms it grows like any float32 rounding does (measured at ngf 64 against
    float64: 4x4 tiles 1e-3..3e-2 of a weight gradient's scale, direct convolution 8e-4..5e-2).
    """
    monkeypatch.setenv("CUT_WINOGRAD_TILE", "2")
    torch.manual_seed(0)
    g = accelerate(ResnetGenerator(ngf=8, n_blocks=2))
    x = torch.randn(2, 3, 64, 64)  # down/up convolutions at 64 and 32, ResNet blocks at 16
    out = g(x)
    names = {type(m).__name__ for m in g.modules()}
    assert "WinogradConv2d" in names
    out.square().mean().backward()
    # Weights only: conv biases in front of an InstanceNorm have a zero true gradient (pure noise).
    weights = [p for p in g.parameters() if p.dim() > 1]
    grads = [p.grad.clone() for p in weights]
    g.zero_grad()
    monkeypatch.setattr(winograd, "MIN_PIXELS", 10**9)
    direct = g(x)
    direct.square().mean().backward()
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (p.grad for p in weights), strict=True):
        # float32 sums in another order (and 4x4 tiles' rounding): against the gradient's scale
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_native_kernels_reject_bad_shapes_with_a_clear_error():
    ops = torch.ops.cut_native
    x = torch.zeros(1, 2, 5, 6)
    with pytest.raises(RuntimeError, match="a map of 1x6 is too small to reflect-pad"):
        ops.winograd_input_transform(torch.zeros(1, 2, 1, 6), 2, 3, 1, 0, torch.zeros(16, 2, 3))
    with pytest.raises(RuntimeError, match="unknown padding 7"):
        ops.winograd_input_transform(x, 2, 3, 7, 0, torch.zeros(16, 2, 9))
    with pytest.raises(RuntimeError, match=r"tile rows \[2, 4\) outside 0..3"):
        ops.winograd_input_transform(torch.zeros(1, 2, 6, 6), 2, 3, 1, 2, torch.zeros(16, 2, 6))
    with pytest.raises(RuntimeError, match=r"v of shape \[16, 2, 6\] is not \(36, 2, tiles\)"):
        ops.winograd_input_transform(torch.zeros(1, 2, 6, 6), 4, 3, 1, 0, torch.zeros(16, 2, 6))
    with pytest.raises(RuntimeError, match=r"no F\(3x3, 3x3\) transforms"):
        ops.winograd_filter_transform(torch.zeros(4, 4, 3, 3), 3)
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        ops.winograd_filter_transform(torch.zeros(4, 4, 3, 3).transpose(0, 1), 2)
    with pytest.raises(ValueError, match="padding must be one of"):
        winograd.conv2d(x, torch.zeros(2, 2, 3, 3), padding="circular")
    with pytest.raises(ValueError, match="tile must be 2, or 4 for 3x3 kernels"):
        winograd.conv2d(x, torch.zeros(2, 2, 3, 3), tile=6)
    with pytest.raises(ValueError, match="tile must be 2, or 4 for 3x3 kernels"):
        winograd.conv2d(x, torch.zeros(2, 2, 4, 4), tile=4)
    with pytest.raises(RuntimeError, match=r"no F\(2x2, 5x5\) transforms"):
        ops.winograd_filter_transform(torch.zeros(2, 2, 5, 5), 2)


@pytest.mark.skipif(native._missing_tool() is not None, reason="no C++ compiler or ninja on this machine")
def test_native_kernels_build_where_a_compiler_exists():
    assert native.available()


def test_without_native_kernels_training_takes_the_direct_convolution():
    code = (
        "import torch; from cut.fast import native, winograd; from cut.fast.conv import WinogradConv2d;"
        "assert not native.available();"
        "x = torch.randn(1, 4, 16, 16, requires_grad=True);"
        "assert not winograd.fits(x, torch.zeros(4, 4, 3, 3), 'zeros');"
        "assert WinogradConv2d(4, 4, padding=1)(x).grad_fn.name() == 'ConvolutionBackward0'"
    )
    env = dict(os.environ, CUT_NATIVE="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels")
def test_inference_reuses_the_filter_transform_until_the_weights_change():
    torch.manual_seed(0)
    conv = WinogradConv2d(16, 16, padding=1).requires_grad_(False)  # a frozen, loaded generator's
    x = torch.randn(1, 16, 40, 40)
    with torch.inference_mode():
        first = conv(x)
        assert hasattr(conv.weight, "_cut_winograd_filter")
        torch.testing.assert_close(conv(x), first, rtol=0, atol=0)
    with torch.no_grad():
        conv.weight.mul_(2)  # an optimizer step, or load_state_dict, updates in place
        direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), direct, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels")
def test_evaluating_a_network_in_training_sees_every_fused_adam_update():
    # fused Adam writes parameters in place without bumping their version counter: a cached filter
    # transform made the periodic evaluation score stale weights
    torch.manual_seed(0)
    conv = WinogradConv2d(16, 16, padding=1)
    opt = torch.optim.Adam(conv.parameters(), lr=0.1, fused=True)
    x = torch.randn(1, 16, 40, 40)
    for _ in range(2):
        with torch.inference_mode():
            evaluated = conv(x)
        with torch.no_grad():
            direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(evaluated, direct, rtol=1e-5, atol=1e-4)
        conv(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _applied_gradients(model, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every gradient one ``train_step`` applies, as each optimizer is about to step (float64 copies)."""
    grads: dict[str, torch.Tensor] = {}
    for prefix, net, opt in (("G", model.netG, model.opt_G), ("D", model.netD, model.opt_D),
                             ("F", model.netF, model.opt_F)):
        names = {id(p): name for name, p in net.named_parameters()}

        def record(optimizer, args, kwargs, prefix=prefix, names=names):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[f"{prefix}.{names[id(p)]}"] = p.grad.detach().double().clone()

        opt.register_step_pre_hook(record)
    model.train_step(real_a, real_b)
    return grads


def _step_errors(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: ||got - exact|| over ||exact||, the latter floored at 1e-8 of its network's whole
    gradient norm, so that tensors whose exact gradient is zero (conv biases in front of an
    InstanceNorm: 1e-16..1e-13 here, pure rounding noise in float32) are measured on that scale."""
    totals: dict[str, torch.Tensor] = {}
    for name, g in exact.items():
        net = name.split(".")[0]
        totals[net] = totals.get(net, 0) + g.square().sum()
    return {
        k: ((got[k] - e).norm() / torch.maximum(e.norm(), 1e-8 * totals[k.split(".")[0]].sqrt())).item()
        for k, e in exact.items()
    }


def record_output_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The output tile each Winograd convolution picks from now on, in order."""
    tiles: list[int] = []
    output_tile = winograd.output_tile

    def recording_output_tile(*args, **kwargs) -> int:
        tiles.append(output_tile(*args, **kwargs))
        return tiles[-1]

    monkeypatch.setattr(winograd, "output_tile", recording_output_tile)
    return tiles


@pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels")
def test_one_cut_step_applies_gradients_as_accurate_as_the_direct_convolutions(monkeypatch):
    """One CUT step (ngf 16, 64 px: F(4x4) tiles in the backward passes on the 64x64 and 32x32
    maps) in float32, against the same step in float64: every gradient G, D and F apply is within 8x
    the error of the same float32 step with direct convolutions everywhere. Per tensor, errors below
    2^-23 (the float32 rounding unit) counting as 2^-23. The F(4x4) forwards of the code before fail:
    their outputs carry ~5x the direct rounding, which moves values across ReLU kinks; one flipped
    ReLU in a PatchNCE head (rows normalised by norms near 1e-6) put its bias gradient 2.5e-3 off
    (direct: 1.1e-6) and G's layer-4 bias 1.5e-3 (direct: 3.6e-6). Such flips are chance events
    for any forward that rounds differently, hence a recorded forward is the direct one; the backward
    passes' rounding moves no kink (measured: within 2x the direct step's error).
    """
    cfg = CUTConfig.from_preset("CUT", ngf=16, ndf=16)
    torch.manual_seed(0)
    real_a, real_b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    exact_model = CUTModel(cfg, seed=0)
    for net in (exact_model.netG, exact_model.netD, exact_model.netF):
        net.double()
    exact = _applied_gradients(exact_model, real_a.double(), real_b.double())

    tiles = record_output_tiles(monkeypatch)
    ours = _step_errors(_applied_gradients(CUTModel(cfg, seed=0), real_a, real_b), exact)
    assert 4 in tiles  # the Winograd path ran, with 4x4 tiles where they pay
    monkeypatch.setattr(winograd, "MIN_PIXELS", 10**9)  # every convolution direct (oneDNN)
    direct = _step_errors(_applied_gradients(CUTModel(cfg, seed=0), real_a, real_b), exact)

    assert set(ours) == set(direct) == set(exact) and len(exact) == len(list(exact_model.parameters()))
    limit = {k: 8 * max(direct[k], 2**-23) for k in exact}
    too_far = {k: f"{ours[k]:.1e} vs direct {direct[k]:.1e}" for k in exact if ours[k] > limit[k]}
    assert not too_far


@pytest.mark.skipif(not native.available(), reason="needs the native CPU kernels")
def test_a_recorded_forward_is_the_direct_convolution_and_inference_keeps_4x4_tiles(monkeypatch):
    torch.manual_seed(0)
    tiles = record_output_tiles(monkeypatch)
    conv, block = WinogradConv2d(16, 16, padding=1), accelerate(ResnetBlock(16))
    x = torch.randn(2, 16, 64, 64)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        want_block = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), block.conv_block[1].weight,
                              block.conv_block[1].bias)
    out = conv(x)  # the weight requires grad: autograd records this forward
    got_block = block.conv_block[1].padded_forward(x, block.conv_block[0])
    assert torch.equal(out, want) and torch.equal(got_block, want_block) and tiles == []
    assert out.grad_fn.name() == got_block.grad_fn.name() == "_WinogradConv2dBackward"
    (out.sum() + got_block.sum()).backward()
    assert tiles == [4, 4]  # both backward passes in 4x4 tiles
    with torch.inference_mode():
        inferred = conv(x)
    assert tiles == [4, 4, 4]
    torch.testing.assert_close(inferred, want, rtol=1e-5, atol=1e-5)
