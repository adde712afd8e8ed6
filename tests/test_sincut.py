"""SinCUT: official StyleGAN2 network layout and numerics, R1 and identity losses, the zoom_and_patch
crops, a short training run and exact resume."""

import ast
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from cut.checkpoint import CheckpointError, read_checkpoint, to_bytes
from cut.losses import gan_loss
from cut.sincut import SinCUTConfig, SinCUTModel, identity_loss, r1_penalty
from cut.stylegan2 import (
    ConvLayer,
    DemodulatedConv2d,
    EqualConv2d,
    EqualLinear,
    FusedLeakyReLU,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
)
from pipeline.single_image import draw_zoom, single_image_batch, zoom_and_patch, zoomed_size

SQRT2 = math.sqrt(2.0)
TAPS = np.array([1.0, 3.0, 3.0, 1.0])
TINY = {
    "netG": "smallstylegan2",
    "ngf": 2,
    "ndf": 2,
    "crop_size": 32,
    "netF_nc": 16,
    "num_patches": 16,
    "nce_layers": (0, 2, 3),
    "batch_size": 4,
}


@pytest.fixture(autouse=True)
def one_thread():
    """These small networks gain nothing from a second thread, and on a shared machine an
    oversubscribed OpenMP pool makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------- the official layout, from its facts
def official_g_widths(ngf):
    """StyleGAN2Encoder/Decoder: round(base * ngf / 32), base 4096 at 4 px halving per doubling,
    capped at 512 up to 32 px."""
    widths = {r: round(16384 / r * ngf / 32) for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024)}
    return {r: min(512, w) if r <= 32 else w for r, w in widths.items()}


def official_d_widths(ndf):
    return {
        r: (min(384, int(16384 / r * ndf / 64)) if r <= 32 else int(16384 / r * ndf / 64))
        for r in (4, 8, 16, 32, 64, 128, 256, 512, 1024)
    }


def conv_layer_keys(prefix, c_in, c_out, k, downsample=False, activate=True):
    keys, i = {}, 0
    if downsample:
        keys[f"{prefix}.0.kernel"] = (4, 4)
        i = 1
    keys[f"{prefix}.{i}.weight"] = (c_out, c_in, k, k)
    if activate:
        keys[f"{prefix}.{i + 1}.bias"] = (1, c_out, 1, 1)
    return keys


def resblock_keys(prefix, c_in, c_out, downsample):
    keys = {
        **conv_layer_keys(f"{prefix}.conv1", c_in, c_in, 3),
        **conv_layer_keys(f"{prefix}.conv2", c_in, c_out, 3, downsample),
    }
    if c_in != c_out or downsample:
        keys.update(conv_layer_keys(f"{prefix}.skip", c_in, c_out, 1, downsample, activate=False))
    return keys


def official_generator_layout(ngf=10, n_blocks=6, num_down=1, res=64):
    ch, keys = official_g_widths(ngf), {}
    keys.update(conv_layer_keys("encoder.convs.1", 3, ch[res], 1))  # encoder.convs.0 is an Identity
    i = 2
    for _ in range(num_down):
        keys.update(resblock_keys(f"encoder.convs.{i}", ch[res], ch[res // 2], True))
        res, i = res // 2, i + 1
    for _ in range(n_blocks // 2):
        keys.update(resblock_keys(f"encoder.convs.{i}", ch[res], ch[res], False))
        i += 1
    i = 0
    for _ in range(n_blocks // 2):
        keys.update(resblock_keys(f"decoder.convs.{i}", ch[res], ch[res], False))
        i += 1
    for _ in range(num_down):
        p = f"decoder.convs.{i}"
        keys.update(
            {
                f"{p}.conv.weight": (1, ch[res * 2], ch[res], 3, 3),
                f"{p}.conv.blur.kernel": (4, 4),
                f"{p}.noise.weight": (1,),
                f"{p}.activate.bias": (1, ch[res * 2], 1, 1),
            }
        )
        res, i = res * 2, i + 1
    keys.update(conv_layer_keys(f"decoder.convs.{i}", ch[res], 3, 1))
    return keys


def official_discriminator_layout(ndf=8, size=64):
    ch = official_d_widths(ndf)
    keys = conv_layer_keys("convs.0", 3, ch[size], 1)
    i, res = 1, size
    while res > 4:
        keys.update(resblock_keys(f"convs.{i}", ch[res], ch[res // 2], True))
        i, res = i + 1, res // 2
    keys.update(conv_layer_keys("final_conv", ch[4], ch[4], 3))
    keys.update(
        {
            "final_linear.0.weight": (ch[4], ch[4] * 16),
            "final_linear.0.bias": (ch[4],),
            "final_linear.1.weight": (1, ch[4]),
            "final_linear.1.bias": (1,),
        }
    )
    return keys


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "ngf,netG_blocks,num_down,res", [(10, 6, 1, 64), (10, 2, 1, 64), (16, 6, 2, 128), (4, 6, 1, 32)]
)
def test_generator_state_dict_equals_the_official_layout(ngf, netG_blocks, num_down, res):
    net = StyleGAN2Generator(3, 3, ngf, netG_blocks, num_down, res)
    assert shapes(net) == official_generator_layout(ngf, netG_blocks, num_down, res)


def test_official_sincut_generator_and_discriminator_shapes():
    g, d = shapes(StyleGAN2Generator()), shapes(StyleGAN2Discriminator())
    # G: round(256 * 10/32) = 80 at 64 px, round(512 * 10/32) = 160 at 32 px; D: int(256 * 8/64) = 32 at 64 px
    assert g["encoder.convs.1.0.weight"] == (80, 3, 1, 1)
    assert g["encoder.convs.2.conv2.1.weight"] == (160, 80, 3, 3)
    assert g["decoder.convs.3.conv.weight"] == (1, 80, 160, 3, 3)
    assert g["decoder.convs.4.0.weight"] == (3, 80, 1, 1)
    assert len([k for k in g if k.startswith("encoder.convs.")]) == 21
    assert d["convs.0.0.weight"] == (32, 3, 1, 1) and d["convs.4.conv2.1.weight"] == (384, 256, 3, 3)
    assert d["final_linear.0.weight"] == (384, 6144)
    assert d == official_discriminator_layout(8, 64)


def test_official_state_dicts_load_strictly_and_are_used():
    torch.manual_seed(0)
    g_state = {k: torch.randn(s) for k, s in official_generator_layout().items()}
    for k in g_state:
        if k.endswith("kernel"):  # the official blur buffers
            g_state[k] = torch.tensor(
                np.outer(TAPS, TAPS) / 64 * (4 if k.startswith("decoder") else 1)
            ).float()
    net = StyleGAN2Generator()
    net.load_state_dict(g_state, strict=True)
    assert torch.equal(net.decoder.convs[4][0].weight, g_state["decoder.convs.4.0.weight"])
    d_state = {k: torch.randn(s) for k, s in official_discriminator_layout().items()}
    for k in d_state:
        if k.endswith("kernel"):
            d_state[k] = torch.tensor(np.outer(TAPS, TAPS) / 64).float()
    StyleGAN2Discriminator().load_state_dict(d_state, strict=True)
    bad = dict(g_state)
    bad.pop("decoder.convs.3.noise.weight")
    with pytest.raises(RuntimeError, match=r"noise\.weight"):
        StyleGAN2Generator().load_state_dict(bad, strict=True)


def test_blur_buffers_hold_the_official_kernels():
    net = StyleGAN2Generator()
    down = net.encoder.convs[2].conv2[0].kernel.double().numpy()
    up = net.decoder.convs[3].conv.blur.kernel.double().numpy()
    np.testing.assert_allclose(down, np.outer(TAPS, TAPS) / 64, rtol=0, atol=1e-7)
    np.testing.assert_allclose(up, np.outer(TAPS, TAPS) / 16, rtol=0, atol=1e-7)


def test_official_nce_layers_pick_the_image_and_two_encoder_blocks():
    cfg = SinCUTConfig()
    net = StyleGAN2Generator(ngf=cfg.ngf, n_blocks=cfg.n_blocks, resolution=cfg.crop_size)
    assert net.layer_count == 6
    feats = net(torch.rand(2, 3, 64, 64), cfg.nce_layers, encode_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(3, 64, 64), (160, 32, 32), (160, 32, 32)]
    assert net.feature_channels(cfg.nce_layers) == [3, 160, 160]
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(net(x, [0], encode_only=True)[0], x)
    with pytest.raises(ValueError, match="outside the encoder"):
        net(x, [6])


# ------------------------------------------------------------- numerics against float64 formulas
def ref_conv(x, w, bias=None, stride=1, pad=0):
    """Cross-correlation, written out: out[n,o,i,j] = sum_c,a,b x[n,c,s*i+a,s*j+b] w[o,c,a,b]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def ref_blur(x, pad, gain=1.0):
    kernel = np.outer(TAPS, TAPS) / 64 * gain
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[0], pad[1])))
    return np.einsum("nchwab,ab->nchw", sliding_window_view(x, (4, 4), axis=(2, 3)), kernel[::-1, ::-1])


def ref_lrelu(x, bias):
    v = x + bias
    return SQRT2 * np.where(v >= 0, v, 0.2 * v)


def ref_conv_layer(sd, p, x, k, downsample=False, activate=True):
    i = 0
    if downsample:
        x = ref_blur(x, ((4 - 2 + k - 1 + 1) // 2, (4 - 2 + k - 1) // 2))
        i = 1
    w = sd[f"{p}.{i}.weight"]
    x = ref_conv(x, w / math.sqrt(w[0].size), stride=2 if downsample else 1, pad=0 if downsample else k // 2)
    return ref_lrelu(x, sd[f"{p}.{i + 1}.bias"]) if activate else x


def ref_resblock(sd, p, x, downsample):
    out = ref_conv_layer(sd, f"{p}.conv2", ref_conv_layer(sd, f"{p}.conv1", x, 3), 3, downsample)
    skip = (
        ref_conv_layer(sd, f"{p}.skip", x, 1, downsample, activate=False)
        if f"{p}.skip.{int(downsample)}.weight" in sd
        else x
    )
    return (out + skip) / SQRT2


def ref_demodulated(weight):
    w = weight[0] / math.sqrt(weight[0, 0].size)
    return w / np.sqrt((w**2).sum(axis=(1, 2, 3), keepdims=True) + 1e-8)


def ref_upsample_conv(x, weight):
    """Stride-2 transposed convolution (each input pixel scatters its 3x3 filter) then the x4 blur."""
    w = ref_demodulated(weight)
    n, _, h, wd = x.shape
    out = np.zeros((n, w.shape[0], 2 * h + 1, 2 * wd + 1))
    for a in range(3):
        for b in range(3):
            out[:, :, a : a + 2 * h : 2, b : b + 2 * wd : 2] += np.tensordot(
                w[:, :, a, b], x, axes=([1], [1])
            ).transpose(1, 0, 2, 3)
    return ref_blur(out, (1, 1), gain=4.0)


def numpy_state(net):
    return {k: v.detach().double().numpy() for k, v in net.state_dict().items()}


def randomised(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.double()


def test_equal_conv_scales_by_one_over_sqrt_fan_in():
    conv = randomised(EqualConv2d(3, 5, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    ref = ref_conv(x.numpy(), w / math.sqrt(3 * 9), b, stride=2, pad=1)
    np.testing.assert_allclose(conv(x).detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    lin = randomised(EqualLinear(6, 4, activation=True))
    v = torch.randn(3, 6, dtype=torch.float64)
    h = v.numpy() @ (lin.weight.detach().numpy() / math.sqrt(6)).T
    np.testing.assert_allclose(lin(v).detach().numpy(), ref_lrelu(h, lin.bias.detach().numpy()), rtol=1e-10)


def test_fused_leaky_relu_has_gain_sqrt2():
    act = randomised(FusedLeakyReLU(2))
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64).reshape(1, 1, 1, 5).expand(1, 2, 1, 5)
    b = act.bias.detach().numpy()
    np.testing.assert_allclose(act(x).detach().numpy(), ref_lrelu(x.numpy(), b), rtol=1e-12)
    np.testing.assert_allclose(
        FusedLeakyReLU(1)(torch.tensor([[[[1.0, -1.0]]]])).detach().numpy().ravel(),
        [SQRT2, -0.2 * SQRT2],
        rtol=1e-6,
    )


def test_downsampling_conv_layer_blurs_then_strides():
    layer = randomised(ConvLayer(2, 3, 3, downsample=True))
    x = torch.randn(2, 2, 8, 10, dtype=torch.float64)
    sd = {f"p.{k}": v for k, v in numpy_state(layer).items()}
    ref = ref_conv_layer(sd, "p", x.numpy(), 3, downsample=True)
    out = layer(x).detach().numpy()
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_upsampling_conv_demodulates_and_doubles_the_size():
    conv = randomised(DemodulatedConv2d(3, 4, 3, upsample=True))
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    out = conv(x).detach().numpy()
    assert out.shape == (2, 4, 10, 12)
    np.testing.assert_allclose(
        out, ref_upsample_conv(x.numpy(), conv.weight.detach().numpy()), rtol=1e-10, atol=1e-12
    )
    w = conv.effective_weight().detach().numpy()
    np.testing.assert_allclose((w**2).sum(axis=(1, 2, 3)), 1.0, rtol=1e-6)  # unit norm, up to the 1e-8 eps


def ref_generator(sd, x, num_down, n_res, noises):
    h = ref_conv_layer(sd, "encoder.convs.1", x, 1)
    feats = {0: x, 1: h}
    i = 2
    for d in range(num_down + n_res):
        h = ref_resblock(sd, f"encoder.convs.{i}", h, downsample=d < num_down)
        feats[i] = h
        i += 1
    for i in range(n_res):
        h = ref_resblock(sd, f"decoder.convs.{i}", h, downsample=False)
    for j in range(num_down):
        p = f"decoder.convs.{n_res + j}"
        h = ref_upsample_conv(h, sd[f"{p}.conv.weight"]) + sd[f"{p}.noise.weight"] * noises[j]
        h = ref_lrelu(h, sd[f"{p}.activate.bias"])
    return ref_conv_layer(sd, f"decoder.convs.{n_res + num_down}", h, 1), feats


def test_generator_matches_a_float64_reference_forward():
    net = randomised(StyleGAN2Generator(3, 3, ngf=1, n_blocks=2, num_downsampling=2, resolution=16))
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    fake, feats = net(x, [0, 2, 4], generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noises = [
        torch.randn((2, 1, 8, 6), generator=g, dtype=torch.float64).numpy(),
        torch.randn((2, 1, 16, 12), generator=g, dtype=torch.float64).numpy(),
    ]
    ref_fake, ref_feats = ref_generator(numpy_state(net), x.numpy(), 2, 1, noises)
    np.testing.assert_allclose(fake.detach().numpy(), ref_fake, rtol=1e-9, atol=1e-11)
    for f, i in zip(feats, [0, 2, 4], strict=True):
        np.testing.assert_allclose(f.detach().numpy(), ref_feats[i], rtol=1e-9, atol=1e-11)


def test_discriminator_matches_a_float64_reference_forward():
    net = randomised(StyleGAN2Discriminator(3, ndf=1, size=16))
    sd = numpy_state(net)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    h = ref_conv_layer(sd, "convs.0", x.numpy(), 1)
    for i in (1, 2):
        h = ref_resblock(sd, f"convs.{i}", h, downsample=True)
    h = ref_conv_layer(sd, "final_conv", h, 3).reshape(2, -1)
    w0, w1 = sd["final_linear.0.weight"], sd["final_linear.1.weight"]
    h = ref_lrelu(h @ (w0 / math.sqrt(w0.shape[1])).T, sd["final_linear.0.bias"])
    ref = h @ (w1 / math.sqrt(w1.shape[1])).T + sd["final_linear.1.bias"]
    np.testing.assert_allclose(net(x).detach().numpy(), ref, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="16, 16"):
        net(torch.zeros(1, 3, 32, 32, dtype=torch.float64))


# --------------------------------------------------------------------------- R1 and identity losses
def test_r1_penalty_equals_half_weight_times_mean_squared_gradient_norm():
    torch.manual_seed(0)
    net = randomised(StyleGAN2Discriminator(3, ndf=1, size=8))
    real = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    penalty = r1_penalty(net(real), real, weight=2.5)
    norms = []
    for i in range(3):  # one image at a time: the gradient of its own logit
        xi = real[i : i + 1].detach().requires_grad_(True)
        (gi,) = torch.autograd.grad(net(xi).sum(), xi)
        norms.append(gi.pow(2).sum().item())
    assert penalty.item() == pytest.approx(2.5 * 0.5 * np.mean(norms), rel=1e-10)
    # spot-check the gradient itself by central differences on one pixel
    eps, idx = 1e-6, (1, 2, 3, 4)
    bumped = real.detach().clone()
    bumped[idx] += eps
    up = net(bumped)[1].item()
    bumped[idx] -= 2 * eps
    fd = (up - net(bumped)[1].item()) / (2 * eps)
    (grad,) = torch.autograd.grad(net(real).sum(), real)
    assert grad[idx].item() == pytest.approx(fd, rel=1e-5)
    penalty.backward()  # the penalty trains D: a double backward reaches its weights
    assert net.final_conv[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(net(real.detach()), real.detach())


def test_identity_loss_is_weighted_l1():
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert identity_loss(a, b, 3.0).item() == pytest.approx(3.0 * (1 + 0 + 2 + 2) / 4)


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_are_the_official_sincut_options():
    cfg = SinCUTConfig()
    expected = {
        "netG": "stylegan2",
        "ngf": 10,
        "ndf": 8,
        "num_downsampling": 1,
        "crop_size": 64,
        "load_size": 1024,
        "nce_layers": (0, 2, 4),
        "num_patches": 1,
        "nce_includes_all_negatives_from_minibatch": True,
        "nce_idt": True,
        "lambda_NCE": 4.0,
        "lambda_GAN": 1.0,
        "lambda_R1": 1.0,
        "lambda_identity": 1.0,
        "gan_mode": "nonsaturating",
        "lr": 0.002,
        "beta1": 0.0,
        "beta2": 0.99,
        "nce_T": 0.07,
        "netF_nc": 256,
        "batch_size": 16,
        "n_epochs": 8,
        "n_epochs_decay": 8,
        "init_type": "xavier",
    }
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.n_blocks == 6 and cfg.inject_noise
    small = SinCUTConfig(netG="smallstylegan2", nce_layers=(0, 2, 3))
    assert small.n_blocks == 2 and not small.inject_noise
    assert SinCUTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"netG": "resnet_9blocks"}, "model.netG"),
        ({"netG": "smallstylegan2"}, "model.nce_layers must lie within"),
        ({"crop_size": 100}, "model.crop_size"),
        ({"crop_size": 64, "load_size": 32}, "model.crop_size"),
        ({"nce_idt": False}, "model.lambda_identity"),
        ({"lambda_R1": -1.0}, "model.lambda_R1"),
        ({"gan_mode": "hinge"}, "model.gan_mode"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        SinCUTConfig(**overrides)
    with pytest.raises(ValueError, match="unknown SinCUT config keys"):
        SinCUTConfig.from_dict({"lambda_r1": 1.0})


# ------------------------------------------------------------------------------- zoom_and_patch
def coordinate_image(width, height):
    """Red = x, green = y: a crop's pixels tell where they came from."""
    yy, xx = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))


def decode(crop):
    return np.rint((crop.numpy() + 1) * 127.5).astype(int)


def test_zoom_and_patch_takes_a_grid_cell_at_a_random_offset():
    img = coordinate_image(100, 70)  # crop 32: 3 x 2 cells, 4 px and 6 px of room
    rng = np.random.default_rng(0)
    lefts, tops = set(), set()
    for index in (1, 7, 13):  # cell 1 of 6: column 0, row 1
        crop = zoom_and_patch(img, rng, crop_size=32, flip=False, zoom=(1.0, 1.0), patch_index=index)
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
        px = decode(crop)
        left, top = px[0, 0, 0], px[1, 0, 0]
        assert 0 <= left <= 4 and 32 <= top <= 38
        np.testing.assert_array_equal(px[0, 0], np.arange(left, left + 32))
        np.testing.assert_array_equal(px[1, :, 0], np.arange(top, top + 32))
        lefts.add(left)
        tops.add(top)
    cells = {
        (decode(c)[0, 0, 0] // 32, decode(c)[1, 0, 0] // 32)
        for c in (zoom_and_patch(img, rng, crop_size=32, flip=False, zoom=(1.0, 1.0)) for _ in range(60))
    }
    assert cells == {(x, y) for x in range(3) for y in range(2)}  # every cell is reachable


def test_zoom_and_patch_ranges_sizes_and_flips():
    rng = np.random.default_rng(1)
    zooms = np.array([draw_zoom(rng) for _ in range(2000)])
    assert zooms.min() >= 1 / 3 and zooms.max() < 1 and zooms.min() < 0.34 and zooms.max() > 0.99
    assert abs(np.corrcoef(zooms[:, 0], zooms[:, 1])[0, 1]) < 0.1  # width and height zoom independently
    assert zoomed_size((300, 90), (0.5, 0.5), 64) == (150, 64)  # never below the crop
    img = coordinate_image(60, 50)
    flips = 0
    for _ in range(200):
        crop = zoom_and_patch(img, rng, crop_size=16)
        assert crop.shape == (3, 16, 16) and crop.min() >= -1 and crop.max() <= 1
        flips += decode(crop)[0, 0, 0] > decode(crop)[0, 0, -1]
    assert 60 < flips < 140
    small = zoom_and_patch(Image.new("L", (20, 12), 200), rng, crop_size=32)  # enlarged to the crop, to RGB
    assert small.shape == (3, 32, 32)
    torch.testing.assert_close(small, torch.full((3, 32, 32), 200 / 127.5 - 1))
    a = zoom_and_patch(img, np.random.default_rng(7), crop_size=16)
    assert torch.equal(a, zoom_and_patch(img, np.random.default_rng(7), crop_size=16))
    with pytest.raises(ValueError, match="crop_size"):
        zoom_and_patch(img, rng, crop_size=30)


def test_single_image_batch_draws_A_and_B_from_their_own_images():
    red, blue = Image.new("RGB", (40, 36), (255, 0, 0)), Image.new("RGB", (44, 40), (0, 0, 255))
    crops_A, crops_B = single_image_batch(red, blue, np.random.default_rng(0), 3, crop_size=16)
    assert crops_A.shape == crops_B.shape == (3, 3, 16, 16)
    assert torch.all(crops_A[:, 0] == 1) and torch.all(crops_B[:, 2] == 1) and torch.all(crops_A[:, 2] == -1)


def test_pipeline_module_imports_no_model_code():
    source = Path(__file__).parents[1] / "pipeline" / "single_image.py"
    imported = {
        node.module.split(".")[0]
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    imported |= {
        a.name.split(".")[0]
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Import)
        for a in node.names
    }
    assert "cut" not in imported and "jobs" not in imported


# ------------------------------------------------------------------------------------ the model
def two_images():
    yy, xx = np.mgrid[0:40, 0:48]
    a = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    yy, xx = np.mgrid[0:36, 0:44]
    b = np.stack([128 + 100 * np.sin(xx / 3), 128 + 100 * np.cos(yy / 4), np.full(xx.shape, 60.0)], -1)
    return Image.fromarray(a), Image.fromarray(b.clip(0, 255).astype(np.uint8))


def batches(n, seed=0):
    image_A, image_B = two_images()
    rng = np.random.default_rng(seed)
    return [
        single_image_batch(image_A, image_B, rng, TINY["batch_size"], crop_size=TINY["crop_size"])
        for _ in range(n)
    ]


def test_short_training_run_learns():
    model = SinCUTModel(SinCUTConfig(**TINY), seed=0)
    history = [model.train_step(a, b) for a, b in batches(40)]
    assert set(history[0]) == {"G_GAN", "D_real", "D_fake", "D_R1", "G", "NCE", "NCE_Y", "idt"}
    assert all(math.isfinite(v) for h in history for v in h.values())
    nce = [h["NCE"] + h["NCE_Y"] for h in history]
    assert np.mean(nce[-10:]) < 0.9 * np.mean(nce[:10])
    assert np.mean([h["idt"] for h in history[-10:]]) < np.mean([h["idt"] for h in history[:10]])
    real_A = batches(1, seed=9)[0][0]
    out = model.translate(real_A)
    assert out.shape == real_A.shape and (out - real_A).abs().mean() > 0.05
    assert model.translate(torch.rand(1, 3, 24, 40) * 2 - 1).shape == (1, 3, 24, 40)  # any even size


def test_generator_loss_uses_the_freshly_updated_discriminator():
    model = SinCUTModel(SinCUTConfig(**{**TINY, "lambda_NCE": 0.0, "lambda_identity": 0.0}), seed=3)
    real_A, real_B = batches(1)[0]
    d_before = {k: v.clone() for k, v in model.netD.state_dict().items()}
    losses = model.train_step(real_A, real_B)
    assert any(not torch.equal(v, model.netD.state_dict()[k]) for k, v in d_before.items())
    with torch.no_grad():
        expected = gan_loss(model.netD(model.visuals["fake_B"]), True, "nonsaturating").item()
    assert losses["G_GAN"] == pytest.approx(expected, rel=1e-5)
    assert "NCE" not in losses and "idt" not in losses


def test_step_objectives_are_the_official_sincut_sums():
    cfg = SinCUTConfig(**{**TINY, "lambda_R1": 3.0, "lambda_identity": 2.0})
    model = SinCUTModel(cfg, seed=1)
    real_A, real_B = batches(1)[0]
    d_before = copy.deepcopy(model.netD)
    grads = {}
    for name, p in model.netD.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    losses = model.train_step(real_A, real_B)
    # D: 0.5 * (softplus(D(fake)) + softplus(-D(real))) + 3.0 / 2 * mean ||grad_x D(real)||^2
    fake_B = model.visuals["fake_B"]
    real = real_B.clone().requires_grad_(True)
    pred_real = d_before(real)
    (g,) = torch.autograd.grad(pred_real.sum(), real, create_graph=True)
    r1 = 1.5 * g.pow(2).flatten(1).sum(1).mean()
    loss_D = (
        0.5
        * (
            torch.nn.functional.softplus(d_before(fake_B)).mean()
            + torch.nn.functional.softplus(-pred_real).mean()
        )
        + r1
    )
    loss_D.backward()
    assert losses["D_R1"] == pytest.approx(r1.item(), rel=1e-5)
    for name, p in d_before.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)
    # G: GAN + the mean of the two NCE terms + the weighted L1 identity loss
    l1 = (model.visuals["idt_B"] - real_B).abs().mean().item()
    assert losses["idt"] == pytest.approx(2.0 * l1, rel=1e-6)
    total = losses["G_GAN"] + 0.5 * (losses["NCE"] + losses["NCE_Y"]) + losses["idt"]
    assert losses["G"] == pytest.approx(total, rel=1e-6)


def test_given_patch_ids_replace_the_sampled_ones():
    cfg = SinCUTConfig(**TINY)
    data = batches(1)
    ids = [torch.tensor([0, 5, 9]), torch.tensor([1, 2, 3]), torch.tensor([4, 8, 15])]
    runs = [SinCUTModel(cfg, seed=0).train_step(*data[0], patch_ids=ids) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["NCE"] != SinCUTModel(cfg, seed=0).train_step(*data[0])["NCE"]


def test_state_dict_round_trip_resumes_bitwise():
    cfg = SinCUTConfig(**TINY)
    data = batches(4, seed=2)
    model = SinCUTModel(cfg, seed=0)
    for a, b in data[:2]:
        model.train_step(a, b)
    saved = read_checkpoint(to_bytes(model.state_dict()))
    expected = [model.train_step(a, b) for a, b in data[2:]]
    resumed = SinCUTModel(cfg, seed=99)
    resumed.load_state_dict(saved)
    assert [resumed.train_step(a, b) for a, b in data[2:]] == expected
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    other = SinCUTModel(SinCUTConfig(**{**TINY, "ngf": 4}), seed=0)
    with pytest.raises(CheckpointError, match="G: checkpoint does not match"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"G": saved["G"]})


def test_train_step_rejects_crops_of_the_wrong_size():
    model = SinCUTModel(SinCUTConfig(**TINY), seed=0)
    with pytest.raises(ValueError, match="real_B must be"):
        model.train_step(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 16, 16))
