"""Numerics: the step's gradients are finite wherever the math is, and as accurate as the official step's."""

import dataclasses

import pytest
import torch

from bench.official import use_official_layers
from cut import CUTConfig, CUTModel
from cut.heads import define_head
from cut.losses import patch_nce_loss
from cut.networks import PatchSampleF, l2_rows


def official_normalize(rows: torch.Tensor) -> torch.Tensor:
    """The official Normalize(2): rows over (their L2 norm + 1e-7)."""
    return rows / (rows.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7)


def zero_rows_head(head: PatchSampleF, index: int) -> None:
    """Make head ``mlp_<index>`` answer every patch with an all-zero row: its hidden ReLU is off
    everywhere (weights 0, bias -1) and its output bias is 0."""
    first, _, last = getattr(head, f"mlp_{index}")
    with torch.no_grad():
        first.weight.zero_()
        first.bias.fill_(-1.0)
        last.bias.zero_()


def test_l2_rows_keeps_the_official_values_bit_for_bit():
    rows = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 1e-6
    rows[3] = 0.0
    assert torch.equal(l2_rows(rows), official_normalize(rows))


@pytest.mark.parametrize("net_f", ["mlp_sample", "sample", "reshape"])
def test_every_head_gives_all_zero_rows_a_finite_gradient(net_f):
    """An all-zero row's norm has the gradient 0 x inf = NaN through a square root; the normalised
    row's true derivative there is finite (the identity over 1e-7), and so must ours be."""
    head = define_head(net_f, [4], nc=8)
    if net_f == "mlp_sample":
        zero_rows_head(head, 0)
    feat = torch.zeros(2, 4, 8, 8, requires_grad=True)
    with torch.no_grad():
        feat[:, :, :4] = torch.randn(2, 4, 4, 8)  # the top half nonzero, the bottom half zero rows
    ids = [torch.tensor([1, 40, 50, 63])]  # one patch above, three in the zero half
    (q,) = head([feat], ids)
    (k,) = head([feat.detach() + 0.5], ids)
    patch_nce_loss(q, k, batch_size=2).mean().backward()
    grads = {"input": feat.grad, **{n: p.grad for n, p in head.named_parameters()}}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads


def test_training_with_a_head_of_all_zero_rows_stays_finite():
    """configs/tiny.yaml's narrow heads (netF_nc 16) on grayscale data can put out all-zero rows;
    the NaN gradient went into F's parameters at step 1 and the loss was NaN from step 2."""
    cfg = CUTConfig.from_preset("CUT", ngf=8, ndf=8, n_blocks=2, netF_nc=16, num_patches=16)
    model = CUTModel(cfg, seed=0)
    zero_rows_head(model.netF, 2)
    gen = torch.Generator().manual_seed(0)
    gray = [(torch.rand(1, 1, 32, 32, generator=gen) * 2 - 1).expand(-1, 3, -1, -1) for _ in range(2)]
    for step in range(3):
        losses = model.train_step(*gray)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), (step, losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def applied_updates(model: CUTModel, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one ``train_step`` adds to each parameter of G, D and F (float64 copies), by network."""
    nets = {"G": model.netG, "D": model.netD, "F": model.netF}
    before = {k: [p.detach().double().clone() for p in net.parameters()] for k, net in nets.items()}
    model.train_step(real_a, real_b)
    after = {k: [p.detach().double() for p in net.parameters()] for k, net in nets.items()}
    return {k: torch.cat([(a - b).flatten() for a, b in zip(after[k], before[k], strict=True)]) for k in nets}


def official_step_model(cfg: CUTConfig) -> CUTModel:
    """The official float32 step (bench.official): keys re-encoded, official layers, default Adam."""
    model = CUTModel(dataclasses.replace(cfg, reuse_keys=False), seed=0)
    adam = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    model.opt_G, model.opt_D, model.opt_F = (
        torch.optim.Adam(net.parameters(), **adam) for net in (model.netG, model.netD, model.netF)
    )
    for net in (model.netG, model.netD):
        use_official_layers(net)
    return model


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_one_step_updates_are_as_accurate_as_the_official_float32_steps(batch):
    """Relative L2 error of each network's update after one CUT step, against the same step in
    float64: ours within 4x the official float32 step's (configs/tiny.yaml's networks, 32 px)."""
    cfg = CUTConfig.from_preset("CUT", ngf=8, ndf=8, n_blocks=2, netF_nc=16, num_patches=16)
    gen = torch.Generator().manual_seed(batch)
    real_a, real_b = (torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(2))
    exact_model = CUTModel(cfg, seed=0)
    for net in (exact_model.netG, exact_model.netD, exact_model.netF):
        net.double()
    exact = applied_updates(exact_model, real_a.double(), real_b.double())
    ours = applied_updates(CUTModel(cfg, seed=0), real_a, real_b)
    official = applied_updates(official_step_model(cfg), real_a, real_b)

    def error(got: dict[str, torch.Tensor], net: str) -> float:
        return ((got[net] - exact[net]).norm() / exact[net].norm()).item()

    errors = {net: (error(ours, net), error(official, net)) for net in exact}
    assert all(e < 1 for pair in errors.values() for e in pair), errors  # the updates do compare
    assert all(mine <= 4 * theirs for mine, theirs in errors.values()), errors
