"""The networks match the official layout: module indices, state-dict names and shapes, outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cut.fast import accelerate
from cut.fast.blur import BilinearUpsample, BlurDownsample
from cut.fast.norm import GroupNormInstanceNorm
from cut.networks import (
    NCE_LAYERS,
    Downsample,
    NLayerDiscriminator,
    PatchSampleF,
    ResnetGenerator,
    Upsample,
    init_weights,
)


def official_upsample(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """The official blur upsampling as docs/official-reference.md §4 describes it."""
    y = F.conv_transpose2d(
        F.pad(x, (1, 1, 1, 1), mode="replicate"), filt, stride=2, padding=2, groups=x.shape[1]
    )
    return y[:, :, 1:, 1:][:, :, :-1, :-1]


@pytest.mark.parametrize("layer", [Upsample, BilinearUpsample])
def test_upsample_equals_official_transposed_blur(layer):
    up = layer(5).double()
    x = torch.randn(2, 5, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(up(x), official_upsample(x, up.filt), rtol=0, atol=1e-12)
    assert up.filt.shape == (5, 1, 4, 4)
    assert up.filt[0].sum().item() == pytest.approx(4.0)


@pytest.mark.parametrize("layer", [Downsample, BlurDownsample])
def test_downsample_is_reflect_padded_binomial_blur_with_stride_2(layer):
    down = layer(3).double()
    x = torch.randn(1, 3, 8, 10, dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    k = (a[:, None] * a[None, :]) / 16
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    naive = torch.stack(
        [
            torch.stack([(padded[0, c, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] * k).sum() for j in range(5)])
            for c in range(3)
            for i in range(4)
        ]
    ).view(1, 3, 4, 5)
    torch.testing.assert_close(down(x), naive)


@pytest.mark.parametrize("size", [(8, 10), (7, 9), (5, 4), (3, 3), (2, 2), (127, 64)])
def test_downsample_and_its_gradient_equal_the_official_depthwise_conv(size):
    """The separable blur and its hand-written transpose against the official layer under autograd."""
    down = BlurDownsample(4).double()
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    official = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), down.filt, stride=2, groups=4)
    ours = down(x)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(official)
    (want,) = torch.autograd.grad(official, x, grad_out)
    (got,) = torch.autograd.grad(ours, x, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert down(x.float()).dtype == torch.float32


def test_instance_norm_equals_the_official_instance_norm_and_its_gradient():
    norm = GroupNormInstanceNorm(4).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64, requires_grad=True)
    ours, official = norm(x), F.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(ours)
    (got,) = torch.autograd.grad(ours, x, grad_out)
    (want,) = torch.autograd.grad(official, x, grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert ours._base is None  # not a view: the in-place ReLU after it needs no CopySlices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="InstanceNorm"):
        norm(torch.randn(1, 3, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("layer", [Downsample, BlurDownsample])
def test_downsample_rejects_a_single_row(layer):
    with pytest.raises(ValueError, match="at least 2x2"):
        layer(1)(torch.randn(1, 1, 1, 8))


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (48, 64), (256, 256)])
def test_generator_preserves_size(size):
    g = ResnetGenerator(ngf=8, n_blocks=2)
    out = g(torch.randn(2, 3, *size))
    assert out.shape == (2, 3, *size)
    assert out.abs().max() <= 1.0


def test_generator_module_indices_and_feature_shapes_match_official():
    g = ResnetGenerator()  # resnet_9blocks, antialiased
    kinds = [type(m).__name__ for m in g.model]
    assert len(kinds) == 32
    assert kinds[0] == "ReflectionPad2d" and kinds[7] == "Downsample" and kinds[11] == "Downsample"
    assert kinds[12:21] == ["ResnetBlock"] * 9 and kinds[21] == "Upsample" and kinds[25] == "Upsample"
    assert kinds[31] == "Tanh"
    feats = g(torch.randn(1, 3, 64, 64), NCE_LAYERS, encode_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (3, 70, 70),
        (128, 64, 64),
        (256, 32, 32),
        (256, 16, 16),
        (256, 16, 16),
    ]
    assert g.feature_channels(NCE_LAYERS) == [3, 128, 256, 256, 256]


def test_features_come_from_the_same_pass_as_the_output():
    g = ResnetGenerator(ngf=8, n_blocks=6)
    x = torch.randn(1, 3, 32, 32)
    out, feats = g(x, NCE_LAYERS)
    torch.testing.assert_close(out, g(x))
    for a, b in zip(feats, g(x, NCE_LAYERS, encode_only=True), strict=True):
        torch.testing.assert_close(a, b)


def test_official_state_dict_names_and_shapes():
    g, d = ResnetGenerator(), NLayerDiscriminator()
    f = PatchSampleF(g.feature_channels(NCE_LAYERS), 256)
    gs, ds, fs = g.state_dict(), d.state_dict(), f.state_dict()
    assert (len(gs), len(ds), len(fs)) == (52, 13, 20)
    assert gs["model.1.weight"].shape == (64, 3, 7, 7)
    assert gs["model.12.conv_block.1.weight"].shape == (256, 256, 3, 3)
    assert gs["model.20.conv_block.5.bias"].shape == (256,)
    assert gs["model.30.weight"].shape == (3, 64, 7, 7)
    assert {k: tuple(v.shape) for k, v in gs.items() if k.endswith("filt")} == {
        "model.7.filt": (128, 1, 3, 3),
        "model.11.filt": (256, 1, 3, 3),
        "model.21.filt": (256, 1, 4, 4),
        "model.25.filt": (128, 1, 4, 4),
    }
    convs = [f"model.{i}.{p}" for i in (0, 3, 7, 11, 14) for p in ("weight", "bias")]
    assert sorted(ds) == sorted([*convs, "model.2.filt", "model.6.filt", "model.10.filt"])
    assert sorted(fs) == sorted(
        f"mlp_{i}.{j}.{p}" for i in range(5) for j in (0, 2) for p in ("weight", "bias")
    )
    assert sum(p.numel() for p in g.parameters()) == 11_378_179
    assert sum(p.numel() for p in d.parameters()) == 2_764_737
    assert sum(p.numel() for p in f.parameters()) == 560_384


def test_discriminator_output_is_30x30_patch_map_at_256():
    assert NLayerDiscriminator()(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert NLayerDiscriminator(antialias=False)(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_without_antialiasing_uses_strided_convs():
    g = ResnetGenerator(ngf=8, n_blocks=2, antialias=False, antialias_up=False)
    assert not any(isinstance(m, (Downsample, Upsample)) for m in g.modules())
    assert g(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert NLayerDiscriminator(ndf=8, n_layers=4, antialias=False)(torch.randn(1, 3, 64, 64)).dim() == 4


def test_init_is_xavier_normal_with_gain_002_and_zero_bias():
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator())
    w = g.model[1].weight
    expected = 0.02 * (2.0 / (3 * 49 + 64 * 49)) ** 0.5
    assert w.std().item() == pytest.approx(expected, rel=0.05)
    assert all(m.bias.abs().max() == 0 for m in g.modules() if isinstance(m, torch.nn.Conv2d))
    assert g.model[7].filt[0, 0, 1, 1].item() == pytest.approx(4 / 16)  # buffers untouched


def test_patch_sample_heads_share_ids_and_normalise():
    f = PatchSampleF([3, 8], nc=16)
    feats = [torch.randn(2, 3, 5, 5), torch.randn(2, 8, 4, 4)]
    ids = [torch.tensor([0, 7, 24]), torch.tensor([1, 2])]
    out = f(feats, ids)
    assert [o.shape for o in out] == [(6, 16), (4, 16)]
    torch.testing.assert_close(out[0].norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    # Row order is batch-major and position 7 is row 1, column 2 (row-major positions).
    row = f.mlp_0(feats[0][1, :, 1, 2][None])
    torch.testing.assert_close(out[0][4], (row / row.norm())[0], atol=1e-6, rtol=1e-5)
    per_image = f(feats, [i.expand(2, -1) for i in ids])
    for a, b in zip(out, per_image, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 32, 32), (3, 32, 32), (1, 3, 30, 32), (1, 3, 4, 4)],
    ids=["channels", "3d", "odd", "tiny"],
)
def test_generator_rejects_inputs_it_cannot_translate(shape):
    with pytest.raises(ValueError, match="generator"):
        ResnetGenerator(ngf=8, n_blocks=2)(torch.randn(*shape))


@pytest.mark.parametrize("init_type", ["normal", "xavier", "kaiming", "orthogonal"])
def test_every_official_init_type_gives_its_distribution(init_type):
    # official models/networks.py init_weights: normal N(0, gain), xavier_normal(gain),
    # kaiming_normal(a=0, fan_in; gain unused), orthogonal(gain); biases 0 (docs/official-reference.md §11)
    from cut.networks import init_weights

    torch.manual_seed(0)
    gain = 0.5
    conv = nn.Conv2d(64, 128, 3)
    init_weights(nn.Sequential(conv), gain, init_type)
    w = conv.weight.detach().flatten(1)  # (128, 576)
    fan_in, fan_out = 64 * 9, 128 * 9
    expected_std = {"normal": gain, "xavier": gain * (2 / (fan_in + fan_out)) ** 0.5,
                    "kaiming": (2 / fan_in) ** 0.5}
    if init_type == "orthogonal":
        torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(128), atol=1e-5, rtol=0)
    else:
        assert w.std().item() == pytest.approx(expected_std[init_type], rel=0.03)
    assert torch.count_nonzero(conv.bias) == 0


def test_the_model_uses_the_configured_init_and_rejects_unknown_ones():
    from cut import CUTConfig, CUTModel

    model = CUTModel(CUTConfig(ngf=8, ndf=8, n_blocks=1, netF_nc=8, num_patches=4, init_type="normal",
                               init_gain=0.3), device="cpu", seed=0)
    first = model.netG.model[1].weight
    assert first.std().item() == pytest.approx(0.3, rel=0.1)
    with pytest.raises(ValueError, match=r"model\.init_type"):
        CUTConfig(init_type="uniform")


def test_the_generator_normalises_with_its_own_instance_norm_whose_gradient_is_right():
    # torch 2.13's CPU F.instance_norm backward is wrong for a channels_last incoming gradient at batch
    # 1 (relative error 1.34); nn.InstanceNorm2d would bring that bug into training
    norms = [m for m in accelerate(ResnetGenerator(ngf=8, n_blocks=2)).modules()
             if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(type(m) is GroupNormInstanceNorm for m in norms)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 12, 12, 8, dtype=torch.float64).permute(0, 3, 1, 2)  # channels_last
    (reference,) = torch.autograd.grad(nn.functional.group_norm(x, 8, eps=1e-5), x, grad)
    x32 = x.detach().float().requires_grad_(True)
    (ours,) = torch.autograd.grad(GroupNormInstanceNorm(8)(x32), x32, grad.float())
    assert ((ours.double() - reference).norm() / reference.norm()).item() < 1e-5


@pytest.mark.parametrize("build", [
    lambda: ResnetGenerator(ngf=8, n_blocks=2),
    lambda: ResnetGenerator(ngf=8, n_blocks=2, antialias=False, antialias_up=False, norm="batch"),
    lambda: NLayerDiscriminator(ndf=8),
    lambda: NLayerDiscriminator(ndf=8, n_layers=4, antialias=False, norm="none"),
])
def test_accelerate_swaps_in_fast_forms_with_the_same_keys_and_function(build):
    torch.manual_seed(0)
    official = init_weights(build(), gain=0.5).double().eval()
    fast = accelerate(copy.deepcopy(official))
    assert fast.state_dict().keys() == official.state_dict().keys()
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in official.state_dict().items())
    assert any(type(m).__module__.startswith("cut.fast") for m in fast.modules())
    assert not any(type(m).__module__.startswith("cut.fast") for m in official.modules())
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(fast(x), official(x), rtol=0, atol=1e-10)


def test_accelerate_picks_the_convolutions_winograd_ran_on():
    names = {name for name, m in accelerate(ResnetGenerator(n_blocks=2)).named_modules()
             if type(m).__name__ == "WinogradConv2d"}
    blocks = {f"model.{i}.conv_block.{j}" for i in (12, 13) for j in (1, 5)}
    assert names == {"model.4", "model.8", "model.15", "model.19"} | blocks
    d = accelerate(NLayerDiscriminator())
    assert [i for i, m in enumerate(d.model) if type(m).__name__ == "WinogradConv2d"] == [3, 7, 11]
