"""SinCUT: CUT trained on crops of one source and one target image (official ``--model sincut``).

The official SinCUT is the CUT step (nce_idt on) with StyleGAN2-based networks, the non-saturating
GAN loss, an R1 penalty on real images added to the discriminator's loss at every step and an L1
identity loss between G(real_B) and real_B added to the generator's (docs/official-reference.md,
section "SinCUT"). As in ``cut.model``, the PatchNCE keys reuse the features of the generator's
forward pass (the encoder has no noise, so they equal the official second pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cut.losses import at_least_fp32, gan_loss, patch_nce_loss
from cut.model import ThreeNetworkModel, check_common_fields
from cut.networks import PatchSampleF, init_weights, sample_patch_ids
from cut.stylegan2 import (
    GENERATOR_VARIANTS,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    network_resolution,
)

PatchIds = Sequence[torch.Tensor]


LOSS_NAMES = ("G_GAN", "D_real", "D_fake", "G", "NCE", "NCE_Y", "D_R1", "idt")


def r1_penalty(pred_real: torch.Tensor, real: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``weight / 2 * mean_i ||d sum(D(real)) / d real_i||^2``: the official SinCUT R1 term.

    ``real`` must require grad and ``pred_real`` be D's output for it. The gradient keeps its graph
    so the penalty trains D (a double backward).
    """
    if not real.requires_grad:
        raise ValueError("r1_penalty: the real images must require grad (call real.requires_grad_())")
    (grad,) = torch.autograd.grad(at_least_fp32(pred_real).sum(), real, create_graph=True)
    return at_least_fp32(grad).pow(2).flatten(1).sum(1).mean() * (0.5 * weight)


def identity_loss(idt_B: torch.Tensor, real_B: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``weight * mean |G(real_B) - real_B|``: the official SinCUT identity-preservation loss."""
    return F.l1_loss(at_least_fp32(idt_B), at_least_fp32(real_B)) * weight


@dataclass(frozen=True)
class SinCUTConfig:
    """The SinCUT model and its step; defaults are the official ``--model sincut`` training options."""

    input_nc: int = 3
    output_nc: int = 3
    netG: str = "stylegan2"  # or "smallstylegan2" (2 blocks instead of 6, no decoder noise)
    ngf: int = 10
    ndf: int = 8
    num_downsampling: int = 1  # official stylegan2_G_num_downsampling
    crop_size: int = 64
    load_size: int = 1024  # only sets the network resolution, with crop_size
    init_type: str = "xavier"  # F's heads only; G and D keep their N(0, 1) equalized-lr weights
    init_gain: float = 0.02
    nce_layers: tuple[int, ...] = (0, 2, 4)
    nce_T: float = 0.07
    num_patches: int = 1
    netF_nc: int = 256
    nce_includes_all_negatives_from_minibatch: bool = True
    nce_idt: bool = True
    lambda_GAN: float = 1.0
    lambda_NCE: float = 4.0
    lambda_R1: float = 1.0
    lambda_identity: float = 1.0
    gan_mode: str = "nonsaturating"
    lr: float = 0.002
    beta1: float = 0.0
    beta2: float = 0.99
    batch_size: int = 16
    n_epochs: int = 8
    n_epochs_decay: int = 8

    def __post_init__(self) -> None:
        check_common_fields(self)
        if self.netG not in GENERATOR_VARIANTS:
            raise ValueError(f"model.netG must be one of {sorted(GENERATOR_VARIANTS)}, got {self.netG!r}")
        for key in ("ngf", "ndf", "num_patches", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.num_downsampling < 0:
            raise ValueError(f"model.num_downsampling must be >= 0, got {self.num_downsampling}")
        resolution = network_resolution(self.load_size, self.crop_size)
        if resolution != self.crop_size:
            raise ValueError(
                f"model.crop_size must be a power of two no larger than model.load_size (the "
                f"discriminator is built for {resolution}x{resolution}), got crop_size "
                f"{self.crop_size}, load_size {self.load_size}"
            )
        if not 8 <= resolution <= 1024 or resolution // 2**self.num_downsampling < 4:
            raise ValueError(
                f"model.crop_size {self.crop_size} with {self.num_downsampling} downsamplings "
                "leaves the generator's channel table (crop 8..1024, lowest resolution >= 4)"
            )
        layers = 2 + self.num_downsampling + GENERATOR_VARIANTS[self.netG] // 2
        if not self.nce_layers or list(self.nce_layers) != sorted(set(self.nce_layers)):
            raise ValueError(f"model.nce_layers must be ascending and distinct, got {list(self.nce_layers)}")
        if self.nce_layers[0] < 0 or self.nce_layers[-1] >= layers:
            raise ValueError(
                f"model.nce_layers must lie within the encoder's modules 0..{layers - 1} "
                f"({self.netG}), got {list(self.nce_layers)}"
            )
        for key in ("lambda_GAN", "lambda_NCE", "lambda_R1", "lambda_identity", "lr"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if self.lambda_identity > 0 and not self.nce_idt:
            raise ValueError(
                "model.lambda_identity > 0 needs model.nce_idt (it compares G(real_B) with real_B)"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(
                f"model.beta1 and model.beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}"
            )

    @property
    def n_blocks(self) -> int:
        return GENERATOR_VARIANTS[self.netG]

    @property
    def inject_noise(self) -> bool:
        """The official decoder injects noise unless netG's name contains 'small'."""
        return "small" not in self.netG

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["nce_layers"] = list(self.nce_layers)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SinCUTConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown SinCUT config keys: {unknown}")
        values = dict(values)
        if "nce_layers" in values:
            values["nce_layers"] = tuple(int(i) for i in values["nce_layers"])
        return cls(**values)


class SinCUTModel(ThreeNetworkModel):
    """Generator G, discriminator D, PatchNCE heads F, their Adam optimizers and the step's RNG
    (patch positions and the decoder's noise)."""

    family = "SinCUT"

    def __init__(self, config: SinCUTConfig, device: str | torch.device = "cpu", seed: int = 0) -> None:
        self.config = config
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.netG = StyleGAN2Generator(
                config.input_nc,
                config.output_nc,
                config.ngf,
                config.n_blocks,
                config.num_downsampling,
                config.crop_size,
                config.inject_noise,
            )
            self.netD = StyleGAN2Discriminator(config.output_nc, config.ndf, config.crop_size)
            self.netF = PatchSampleF(self.netG.feature_channels(config.nce_layers), config.netF_nc)
            init_weights(self.netF, config.init_gain, config.init_type)
        for net in (self.netG, self.netD, self.netF):
            net.to(self.device)
        self._make_optimizers(config.lr, config.beta1, config.beta2)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.visuals: dict[str, torch.Tensor] = {}

    def _check_batch(self, real_A: torch.Tensor, real_B: torch.Tensor) -> None:
        size = self.config.crop_size
        for name, x, nc in (
            ("real_A", real_A, self.config.input_nc),
            ("real_B", real_B, self.config.output_nc),
        ):
            if x.dim() != 4 or x.shape[1] != nc or tuple(x.shape[-2:]) != (size, size):
                raise ValueError(
                    f"{name} must be (N, {nc}, {size}, {size}) crops, got shape {tuple(x.shape)}"
                )
        if real_A.shape[0] != real_B.shape[0]:
            raise ValueError(
                f"real_A and real_B must hold as many crops, got {real_A.shape[0]} and {real_B.shape[0]}"
            )

    # ------------------------------------------------------------------------------------------ step
    def train_step(
        self, real_A: torch.Tensor, real_B: torch.Tensor, patch_ids: PatchIds | None = None, sync: bool = True
    ) -> dict[str, Any]:
        """One D update (GAN + R1) then one G+F update (GAN + PatchNCE + identity), the official order.

        ``patch_ids`` (one id tensor per NCE layer) replaces the sampled patch positions of both NCE
        terms. Returns the losses as floats (0-d tensors if not ``sync``).
        """
        cfg = self.config
        self._check_batch(real_A, real_B)
        real_A = real_A.to(self.device)
        real_B = real_B.to(self.device)
        n = real_A.shape[0]
        real = torch.cat([real_A, real_B]) if cfg.nce_idt else real_A
        fake, feats_real = self.netG(real, cfg.nce_layers, generator=self.generator)
        fake_B = fake[:n]
        losses: dict[str, torch.Tensor] = {}

        # D: GAN loss on the detached fake and on real_B, plus R1 on real_B, every step.
        self.netD.requires_grad_(True)
        losses["D_fake"] = gan_loss(self.netD(fake_B.detach()), False, cfg.gan_mode)
        real_B_in = real_B.detach().requires_grad_(cfg.lambda_R1 > 0)
        pred_real = self.netD(real_B_in)
        losses["D_real"] = gan_loss(pred_real, True, cfg.gan_mode)
        loss_D = 0.5 * (losses["D_fake"] + losses["D_real"])
        if cfg.lambda_R1 > 0:
            losses["D_R1"] = r1_penalty(pred_real, real_B_in, cfg.lambda_R1)
            loss_D = loss_D + losses["D_R1"]
        loss_D.backward()
        self.opt_D.step()
        self.opt_D.zero_grad(set_to_none=True)

        # G and F against the updated D.
        self.netD.requires_grad_(False)
        loss_G = torch.zeros((), device=self.device)
        if cfg.lambda_GAN > 0:
            losses["G_GAN"] = gan_loss(self.netD(fake_B), True, cfg.gan_mode) * cfg.lambda_GAN
            loss_G = loss_G + losses["G_GAN"]
        if cfg.lambda_NCE > 0:
            loss_G = self._with_nce(losses, loss_G, self._nce_terms(fake, feats_real, patch_ids))
        if cfg.lambda_identity > 0:
            losses["idt"] = identity_loss(fake[n:], real_B, cfg.lambda_identity)
            loss_G = loss_G + losses["idt"]
        return self._finish_step(loss_G, losses, real_A, real_B, fake, sync)

    def _nce_terms(
        self, fake: torch.Tensor, feats_real: list[torch.Tensor], patch_ids: PatchIds | None
    ) -> list[torch.Tensor]:
        """[NCE(real_A -> fake_B), NCE(real_B -> idt_B)]: keys are the forward's source features
        (detached), queries the encoder's features of the outputs; each term draws its own patch
        positions and takes negatives only from its own group of crops, as officially."""
        cfg = self.config
        groups = 2 if cfg.nce_idt else 1
        per_group = fake.shape[0] // groups
        feats_q = self.netG(fake, cfg.nce_layers, encode_only=True)
        terms = []
        for g in range(groups):
            part = slice(g * per_group, (g + 1) * per_group)
            keys_in = [f[part].detach() for f in feats_real]
            if patch_ids is None:
                ids = sample_patch_ids(keys_in, cfg.num_patches, self.generator)
            else:
                ids = [i.to(f.device) for i, f in zip(patch_ids, keys_in, strict=True)]
            with torch.no_grad():
                keys = self.netF(keys_in, ids)
            queries = self.netF([f[part] for f in feats_q], ids)
            total = torch.zeros((), device=fake.device)
            for q, k in zip(queries, keys, strict=True):
                loss = patch_nce_loss(
                    q, k, per_group, cfg.nce_T, cfg.nce_includes_all_negatives_from_minibatch
                )
                total = total + (loss * cfg.lambda_NCE).mean()
            terms.append(total / len(cfg.nce_layers))
        return terms

    # ------------------------------------------------------------------------------------ inference
    @torch.inference_mode()
    def translate(self, real_A: torch.Tensor, noise_seed: int = 0) -> torch.Tensor:
        """G(real_A) for an image of any size whose sides are multiples of 2**num_downsampling (the
        official test runs the whole image). The decoder's noise comes from ``noise_seed``."""
        noise = torch.Generator().manual_seed(noise_seed)
        return self.netG(real_A.to(self.device), generator=noise).float()

