"""Every official generator, discriminator, norm and dropout option: the official structure key by key
(rebuilt here from the documented layer lists, docs/official-reference.md "Network options"), the
same outputs with the same weights, official checkpoints that load strictly, a CUT step with each
option, and config errors that name the key."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cut import CUTConfig, CUTModel, PixelDiscriminator, ResnetGenerator, UnetGenerator
from cut.checkpoint import export_generator, generator_from_checkpoint, read_checkpoint, to_bytes
from cut.fast import accelerate
from cut.networks import NLayerDiscriminator, define_discriminator
from cut.tiling import TiledGenerator, default_tile_size, tileable, tiled_forward
from jobs.config import ConfigError, TrainConfig, load_config, resolve_train_config

NORMS = ("instance", "batch", "none")


# ------------------------------------------------------------------- the official structure, rebuilt
class OfficialDown(nn.Module):
    """Reflect pad 1, depthwise [1,2,1]x[1,2,1]/16 convolution with stride 2 (buffer ``filt``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (a[:, None] * a[None, :] / 16).repeat(c, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class OfficialUp(nn.Module):
    """Replicate pad 1, depthwise transposed [1,3,3,1]^2/64*4 convolution (stride 2, padding 2), one
    row and column cropped at each side (buffer ``filt``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("filt", (a[:, None] * a[None, :] / 64 * 4).repeat(c, 1, 1, 1))

    def forward(self, x):
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2,
                               groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]


class Residual(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class Level(nn.Module):
    """A U-Net level: ``model``, with the input concatenated in front unless outermost. The input goes
    into the concatenation after the level's first (in-place) layer has run, as in the official code."""

    def __init__(self, layers: list[nn.Module], skip: bool) -> None:
        super().__init__()
        self.model, self.skip = nn.Sequential(*layers), skip

    def forward(self, x):
        return torch.cat([x, self.model(x)], 1) if self.skip else self.model(x)


def norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)  # affine, running statistics
    return nn.InstanceNorm2d(c) if kind == "instance" else nn.Identity()  # no affine, no statistics


def holder(name: str, module: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict([(name, module)]))


def official_resnet(ngf: int, n_blocks: int, kind: str, dropout: bool) -> nn.Module:
    bias = kind == "instance"
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=bias), norm(kind, ngf), nn.ReLU(True)]
    for m in (1, 2):
        layers += [nn.Conv2d(ngf * m, ngf * m * 2, 3, padding=1, bias=bias), norm(kind, ngf * m * 2),
                   nn.ReLU(True), OfficialDown(ngf * m * 2)]
    d = ngf * 4
    for _ in range(n_blocks):
        block = [nn.ReflectionPad2d(1), nn.Conv2d(d, d, 3, bias=bias), norm(kind, d), nn.ReLU(True)]
        block += [nn.Dropout(0.5)] if dropout else []
        block += [nn.ReflectionPad2d(1), nn.Conv2d(d, d, 3, bias=bias), norm(kind, d)]
        layers.append(Residual(block))
    for m in (4, 2):
        layers += [OfficialUp(ngf * m), nn.Conv2d(ngf * m, ngf * m // 2, 3, padding=1, bias=bias),
                   norm(kind, ngf * m // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    return holder("model", nn.Sequential(*layers))


def official_unet(num_downs: int, ngf: int, kind: str, dropout: bool) -> nn.Module:
    bias = kind == "instance"

    def level(outer, inner, sub=None, input_nc=None, outermost=False, drop=False):
        down = nn.Conv2d(input_nc or outer, inner, 4, 2, 1, bias=bias)
        if outermost:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1)
            return Level([down, sub, nn.ReLU(True), up, nn.Tanh()], False)
        if sub is None:
            return Level([nn.LeakyReLU(0.2, True), down, nn.ReLU(True),
                          nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias), norm(kind, outer)], True)
        layers = [nn.LeakyReLU(0.2, True), down, norm(kind, inner), sub, nn.ReLU(True),
                  nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=bias), norm(kind, outer)]
        return Level(layers + ([nn.Dropout(0.5)] if drop else []), True)

    block = level(ngf * 8, ngf * 8)
    for _ in range(num_downs - 5):
        block = level(ngf * 8, ngf * 8, block, drop=dropout)
    for m in (4, 2, 1):
        block = level(ngf * m, ngf * m * 2, block)
    return holder("model", level(3, ngf, block, input_nc=3, outermost=True))


def official_patchgan(ndf: int, n_layers: int, kind: str) -> nn.Module:
    bias = kind == "instance"
    layers = [nn.Conv2d(3, ndf, 4, 1, 1), nn.LeakyReLU(0.2, True), OfficialDown(ndf)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=bias), norm(kind, ndf * mult),
                   nn.LeakyReLU(0.2, True), OfficialDown(ndf * mult)]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=bias), norm(kind, ndf * mult),
               nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return holder("model", nn.Sequential(*layers))


def official_pixelgan(ndf: int, kind: str) -> nn.Module:
    bias = kind == "instance"
    return holder("net", nn.Sequential(
        nn.Conv2d(3, ndf, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(ndf, ndf * 2, 1, bias=bias),
        norm(kind, ndf * 2), nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * 2, 1, 1, bias=bias)))


# ----------------------------------------------------------------------------------------- helpers
def shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def lively(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases and batch statistics, so that every layer changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point() or name.endswith("filt"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight") and t.dim() == 1:  # a batch norm's scale
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.dim() == 4:  # scaled to the fan-in: activations neither vanish nor explode without norm
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return net


def assert_same(ours: torch.Tensor, official: torch.Tensor) -> None:
    """Equal up to float32 rounding (our CPU convolutions sum in another order)."""
    assert ours.shape == official.shape
    assert (ours - official).abs().max() <= 2e-4 * max(1.0, float(official.abs().max()))


def same_outputs(ours: nn.Module, official: nn.Module, x: torch.Tensor, train_too: bool) -> None:
    official.load_state_dict(ours.state_dict(), strict=True)
    modes = (False, True) if train_too else (False,)
    for training in modes:  # eval: running statistics, no dropout; train: batch statistics
        ours.train(training)
        official.train(training)
        with torch.no_grad():
            assert_same(ours(x.clone()), official(x.clone()))


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


GENERATORS = (
    [("resnet_9blocks", kind, False) for kind in NORMS]
    + [("resnet_6blocks", kind, True) for kind in NORMS]
    + [(name, kind, kind == "batch") for name in ("unet_128", "unet_256") for kind in NORMS]
)
# each netG, and each norm and dropout of each family, as an official checkpoint
CHECKPOINTS = [("resnet_9blocks", "instance", False), ("resnet_9blocks", "none", False),
               ("resnet_6blocks", "batch", True), ("resnet_6blocks", "none", True),
               ("unet_128", "batch", True), ("unet_128", "none", False), ("unet_256", "instance", False)]
DISCRIMINATORS = [("basic", 3), ("n_layers", 2), ("n_layers", 4), ("pixel", 3)]


def ours_and_official(netG: str, kind: str, dropout: bool) -> tuple[nn.Module, nn.Module, int]:
    if netG.startswith("resnet"):
        blocks = 9 if netG == "resnet_9blocks" else 6
        return (accelerate(ResnetGenerator(ngf=4, n_blocks=blocks, norm=kind, use_dropout=dropout)),
                official_resnet(4, blocks, kind, dropout), 32)
    downs = 7 if netG == "unet_128" else 8
    return (accelerate(UnetGenerator(num_downs=downs, ngf=4, norm=kind, use_dropout=dropout)),
            official_unet(downs, 4, kind, dropout), 2**downs)


# --------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize(("netG", "kind", "dropout"), GENERATORS)
def test_each_generator_has_the_official_keys_shapes_and_outputs(netG, kind, dropout):
    ours, official, size = ours_and_official(netG, kind, dropout)
    assert shapes(ours) == shapes(official)
    same_outputs(lively(ours), official, images(2, size), train_too=not dropout)


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize(("netD", "n_layers_D"), DISCRIMINATORS)
def test_each_discriminator_has_the_official_keys_shapes_and_outputs(netD, n_layers_D, kind):
    ours = accelerate(define_discriminator(netD, 3, 4, n_layers_D, kind))
    if netD == "pixel":
        assert isinstance(ours, PixelDiscriminator)
        official = official_pixelgan(4, kind)
    else:
        assert isinstance(ours, NLayerDiscriminator)
        official = official_patchgan(4, 3 if netD == "basic" else n_layers_D, kind)
    assert shapes(ours) == shapes(official)
    same_outputs(lively(ours), official, images(2, 64), train_too=True)


def test_basic_ignores_n_layers_d_as_the_official_define_d_does():
    basic = define_discriminator("basic", n_layers_D=5, ndf=4)
    assert shapes(basic) == shapes(official_patchgan(4, 3, "instance"))


def test_batch_norm_layers_are_affine_with_running_statistics_and_convolutions_lose_their_bias():
    g = ResnetGenerator(ngf=4, n_blocks=1, norm="batch")
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.affine and m.track_running_stats for m in bns)
    assert "model.1.bias" not in g.state_dict()
    assert "model.22.bias" in g.state_dict()  # the output convolution keeps its bias
    none = ResnetGenerator(ngf=4, n_blocks=1, norm="none")
    assert [k for k in none.state_dict() if k.endswith("bias")] == ["model.22.bias"]
    assert any(isinstance(m, nn.Identity) for m in none.modules())


def test_features_without_norm_alias_as_the_official_in_place_relu_makes_them():
    g = lively(ResnetGenerator(ngf=4, n_blocks=2, norm="none"))
    x, layers = images(1, 32), (0, 4, 8, 12, 16)
    with torch.no_grad():
        conv4 = g.model[:5](x.clone())  # module 4 is a convolution, then an identity norm and a ReLU_
        _, feats = g(x.clone(), layers)
        encoded = g(x.clone(), layers, encode_only=True)
        assert (conv4 < 0).any() and torch.equal(feats[1], conv4.relu())  # overwritten in place
        assert all(torch.equal(a, b) for a, b in zip(feats, encoded, strict=True))
        # as the last layer asked for, encode_only stops before the ReLU; the full pass keeps a copy
        assert torch.equal(g(x.clone(), (0, 4), encode_only=True)[1], conv4)
        assert torch.equal(g(x.clone(), (0, 4))[1][1], conv4)


# ----------------------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize(("netG", "kind", "dropout"), CHECKPOINTS)
def test_an_official_checkpoint_of_each_generator_loads_strictly_and_translates_alike(netG, kind, dropout):
    ours, official, size = ours_and_official(netG, kind, dropout)
    lively(official, seed=3).eval()
    data = to_bytes({k: v.clone() for k, v in official.state_dict().items()})  # latest_net_G.pth
    loaded = generator_from_checkpoint(read_checkpoint(data, "latest_net_G.pth"))
    expected = dict(ours.architecture)
    if isinstance(ours, UnetGenerator):
        expected["use_dropout"] = False  # a U-Net's dropout leaves no trace in its weights
    assert type(loaded) is type(ours) and loaded.architecture == expected
    x = images(1, size)
    with torch.no_grad():
        assert_same(loaded(x), official(x))
        exported = generator_from_checkpoint(read_checkpoint(to_bytes(export_generator(loaded))))
        assert exported.architecture == loaded.architecture
        assert torch.equal(exported(x), loaded(x))


def test_an_export_written_before_the_options_existed_still_loads():
    g = lively(ResnetGenerator(ngf=4, n_blocks=1))
    old = export_generator(g)
    for key in ("norm", "use_dropout"):
        del old["architecture"][key]
    loaded = generator_from_checkpoint(old)
    assert loaded.architecture == g.architecture


# ------------------------------------------------------------------------------------------ dropout
def test_dropout_is_off_by_default_and_otherwise_the_official_dropout_in_every_block():
    default = CUTModel(CUTConfig(ngf=4, ndf=4, n_blocks=2, netF_nc=8, num_patches=4)).netG
    assert CUTConfig().no_dropout and not any(isinstance(m, nn.Dropout) for m in default.modules())
    on = CUTModel(CUTConfig(ngf=4, ndf=4, n_blocks=2, netF_nc=8, num_patches=4, no_dropout=False)).netG
    blocks = [on.model[i] for i in (12, 13)]
    assert all(isinstance(b.conv_block[4], nn.Dropout) and b.conv_block[4].p == 0.5 for b in blocks)
    keys = on.state_dict()
    assert "model.12.conv_block.6.weight" in keys and "model.12.conv_block.5.weight" not in keys
    x = images(1, 32)
    with torch.no_grad():
        assert not torch.equal(on.train()(x), on(x))  # fresh masks each pass
        assert torch.equal(on.eval()(x), on(x))
    unet = UnetGenerator(num_downs=7, ngf=4, use_dropout=True)
    assert sum(isinstance(m, nn.Dropout) for m in unet.modules()) == 2  # the num_downs - 5 middle levels


# ------------------------------------------------------------------------------------------- a step
# every discriminator with every norm, and every generator norm three times
STEPS = [(d, dn, gn) for d in ("basic", "n_layers", "pixel")
         for dn, gn in zip(NORMS, (*NORMS[1:], NORMS[0]), strict=True)]


@pytest.mark.parametrize(("netD", "normD", "normG"), STEPS)
def test_a_cut_step_trains_with_each_discriminator_and_norm(netD, normD, normG):
    # kaiming: without a norm, the default init (xavier, gain 0.02) shrinks the activations ~50x per
    # convolution, to exact zeros whose PatchNCE normalisation has a NaN gradient, officially too
    cfg = CUTConfig(ngf=4, ndf=4, n_blocks=1, netF_nc=8, num_patches=4, netD=netD, normD=normD, normG=normG,
                    n_layers_D=2 if netD == "n_layers" else 3, init_type="kaiming")
    m = CUTModel(cfg, seed=0)
    before = {k: v.clone() for k, v in [*m.netG.state_dict().items(), *m.netD.state_dict().items()]}
    d_batches, g_batches = [], []
    m.netD.register_forward_pre_hook(lambda _, args: d_batches.append(args[0].shape[0]))
    m.netG.register_forward_pre_hook(lambda _, args: g_batches.append(args[0].shape[0]))
    losses = m.train_step(images(2, 32, seed=1), images(2, 32, seed=2))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and "NCE_Y" in losses
    after = {**m.netG.state_dict(), **m.netD.state_dict()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("weight") for k in changed)
    if "batch" in (normD, normG):
        assert any(k.endswith("running_mean") for k in changed)
    # batch norm needs the official separate passes: D judges fakes, then reals, then fakes for G;
    # G encodes fake_B, real_A, idt_B and real_B on their own after the batched translation
    assert d_batches == ([2, 2, 2] if normD == "batch" else [4, 2])
    assert g_batches == ([4, 2, 2, 2, 2] if normG == "batch" else [4, 4])
    resumed = CUTModel(cfg, seed=5)
    resumed.load_state_dict(read_checkpoint(to_bytes(m.state_dict())))
    x = images(1, 32, seed=3)
    assert torch.equal(resumed.translate(x), m.translate(x))
    assert generator_from_checkpoint(m.state_dict()).architecture == m.netG.architecture


def test_translate_runs_batch_norm_in_eval_mode_and_leaves_the_mode_alone():
    m = CUTModel(CUTConfig(ngf=4, ndf=4, n_blocks=1, netF_nc=8, num_patches=4, normG="batch"))
    lively(m.netG)
    stats = m.netG.model[2].running_mean.clone()
    x = images(2, 32)
    assert_same(m.translate(x)[:1], m.translate(x[:1]))  # running statistics, not the batch's
    assert torch.equal(m.netG.model[2].running_mean, stats) and m.netG.training


def test_sync_batch_norm_conversion_keeps_parameters_state_and_a_working_step():
    m = CUTModel(CUTConfig(ngf=4, ndf=4, n_blocks=1, netF_nc=8, num_patches=4, normG="batch", normD="batch"))
    keys = (list(m.netG.state_dict()), list(m.netD.state_dict()))
    params = {id(p) for p in m.parameters()}
    m.wrap(lambda net: net, sync_batch_norm=True)
    for net in (m.netG, m.netD):
        kinds = {type(x) for x in net.modules()}
        assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert (list(m.netG.state_dict()), list(m.netD.state_dict())) == keys
    assert {id(p) for p in m.parameters()} == params  # the optimizers still hold them
    in_opt = {id(p) for opt in m.optimizers for group in opt.param_groups for p in group["params"]}
    assert params <= in_opt
    losses = m.train_step(images(2, 32), images(2, 32, seed=2))  # no process group: plain batch norm
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


# ------------------------------------------------------------------------------------------- config
def train_config(*overrides: str) -> TrainConfig:
    base = ["data.a=/a", "data.b=/b", "run.url=/run"]
    return resolve_train_config(load_config(TrainConfig, overrides=[*base, *overrides]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.netG=resnet_12blocks", r"model\.netG must be one of resnet_9blocks, resnet_6blocks, unet_"),
        ("model.netG=unet_256", r"model\.netG unet_256 cannot train CUT"),
        ("model.netD=stylegan2", r"model\.netD must be one of basic, n_layers, pixel"),
        ("model.normG=layer", r"model\.normG must be one of instance, batch, none"),
        ("model.normD=Batch", r"model\.normD must be one of"),
        ("model.n_layers_D=4", r"model\.n_layers_D 4 is used only with model\.netD n_layers"),
        ("model.no_dropout=maybe", r"model\.no_dropout' must be bool"),
    ],
)
def test_the_config_rejects_bad_network_options_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        train_config(override)


def test_the_config_builds_each_option_and_names_the_block_count():
    from jobs.config import cut_config

    c = cut_config(train_config("model.netG=resnet_6blocks", "model.netD=n_layers", "model.n_layers_D=5",
                                "model.normG=batch", "model.normD=none", "model.no_dropout=false"), "cpu")
    assert (c.netG, c.n_blocks, c.netD, c.n_layers_D, c.normG, c.normD, c.no_dropout) == (
        "resnet_6blocks", 6, "n_layers", 5, "batch", "none", False)
    assert cut_config(train_config("model.n_blocks=2"), "cpu").n_blocks == 2  # a count overrides the name
    assert CUTConfig().n_blocks == 9 and CUTConfig(netG="resnet_6blocks").n_blocks == 6


# ------------------------------------------------------------------------------------------- tiling
def test_generators_tiles_cannot_reproduce_are_translated_whole():
    gib = 2**30
    for netG in (ResnetGenerator(ngf=4, n_blocks=1, norm="batch"), UnetGenerator(num_downs=7, ngf=4)):
        assert not tileable(netG) and default_tile_size(netG, 16 * gib) == 0
        with pytest.raises(ValueError, match="tiled translation is exact only for a ResNet generator"):
            TiledGenerator(netG, 256)
        assert TiledGenerator(netG, 0).tile == 0
    assert default_tile_size(ResnetGenerator(ngf=4, n_blocks=1), 16 * gib) >= 256


def test_a_generator_without_norm_tiles_exactly():
    torch.manual_seed(0)
    netG = accelerate(ResnetGenerator(ngf=4, n_blocks=2, norm="none")).eval()
    x = images(1, 96)[..., :64]
    with torch.inference_mode():
        expected = netG(x)
    assert (tiled_forward(netG, x, 32) - expected).abs().max() <= 1e-5


def test_jobs_infer_translates_a_batch_norm_generator_whole_and_refuses_tiles_for_it(tmp_path):
    from test_infer import image_folder, infer_here

    ckpt = tmp_path / "g.pt"
    ckpt.write_bytes(to_bytes(export_generator(lively(ResnetGenerator(ngf=4, n_blocks=1, norm="batch")))))
    src = image_folder(tmp_path / "in", 2)
    common = ["--checkpoint", str(ckpt), "--input", str(src), "--device", "cpu"]
    refused = infer_here(*common, "--out", str(tmp_path / "tiled"), "--tile-size", "64")
    assert refused.returncode == 2 and "--tile-size 64" in refused.stderr  # a flag the model cannot take
    assert "cannot translate exactly" in refused.stderr
    done = infer_here(*common, "--out", str(tmp_path / "whole"))
    assert done.returncode == 0, done.stderr
    assert "every input is translated whole" in done.stderr
