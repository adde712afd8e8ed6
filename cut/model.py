"""The CUT / FastCUT model: three networks, three optimizers and one training step.

One step is the official order: a discriminator update, then a generator and head update against
the freshly updated discriminator (docs/official-reference.md §9). The math is the official one; the
speed comes from not recomputing what the generator's forward pass already produced (the PatchNCE
keys), from never building autograd graphs that nothing uses, from cheaper kernels for the same
functions (``cut.fast``: separable blur, group-norm instance norm, Winograd convolutions on the
CPU, swapped into the official ``cut.networks`` where the networks are built) and from fused Adam.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cut.checkpoint import load_strict
from cut.fast import accelerate
from cut.fast.plain import plain_operators
from cut.heads import HEADS, define_head
from cut.losses import GAN_MODES, gan_loss, gradient_penalty, patch_nce_loss
from cut.networks import (
    DISCRIMINATORS,
    INIT_TYPES,
    NCE_LAYERS,
    NORM_TYPES,
    ResnetGenerator,
    define_discriminator,
    generator_layer_count,
    init_weights,
    sample_patch_ids,
)
from cut.unet import UNET_DOWNS

PRESETS: dict[str, dict[str, Any]] = {
    "CUT": {"nce_idt": True, "lambda_NCE": 1.0, "flip_equivariance": False},
    "FastCUT": {"nce_idt": False, "lambda_NCE": 10.0, "flip_equivariance": True},
}

PatchIds = Sequence[torch.Tensor]

RESNET_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}  # the official define_G names
GENERATORS = (*RESNET_BLOCKS, *UNET_DOWNS)


def check_common_fields(config: Any) -> None:
    """The value rules of the fields CUTConfig and SinCUTConfig share. The fields are the training
    config's ``model.*`` keys, so the messages name those keys."""
    channels = ">= 1 (1-4: L, LA, RGB, RGBA images; more: .npy arrays)"
    rules = (
        ("input_nc", config.input_nc >= 1, channels),
        ("output_nc", config.output_nc >= 1, channels),
        ("init_type", config.init_type in INIT_TYPES, ", ".join(INIT_TYPES)),
        ("init_gain", config.init_gain > 0, "> 0"),
        ("netF_nc", config.netF_nc >= 1, ">= 1"),
    )
    for name, ok, expected in rules:
        if not ok:
            raise ValueError(f"config key 'model.{name}' must be {expected}")
    if config.gan_mode not in GAN_MODES:
        raise ValueError(f"model.gan_mode must be one of {GAN_MODES}, got {config.gan_mode!r}")
    if config.nce_T <= 0:
        raise ValueError(f"model.nce_T must be > 0, got {config.nce_T}")


@dataclass(frozen=True)
class CUTConfig:
    """Everything that defines the model and its step; defaults are the official CUT options."""

    preset: str = "CUT"
    input_nc: int = 3
    output_nc: int = 3
    ngf: int = 64
    ndf: int = 64
    netG: str = "resnet_9blocks"
    netD: str = "basic"
    n_blocks: int | None = None  # None: as netG names (9 or 6); resolved in __post_init__
    n_layers_D: int = 3
    normG: str = "instance"
    normD: str = "instance"
    no_dropout: bool = True
    antialias: bool = True
    antialias_up: bool = True
    init_type: str = "xavier"
    init_gain: float = 0.02
    nce_layers: tuple[int, ...] = NCE_LAYERS
    nce_T: float = 0.07
    num_patches: int = 256
    netF_nc: int = 256
    netF: str = "mlp_sample"  # the PatchNCE head: mlp_sample, sample or reshape (cut.heads)
    nce_includes_all_negatives_from_minibatch: bool = False
    lambda_GAN: float = 1.0
    lambda_NCE: float = 1.0
    nce_idt: bool = True
    flip_equivariance: bool = False
    gan_mode: str = "lsgan"
    lambda_gp: float = 0.0  # WGAN-GP penalty weight in D's loss; 0: none, as the official CUT
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    reuse_keys: bool = True
    channels_last: bool = False
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        check_common_fields(self)
        if self.nce_idt and self.input_nc != self.output_nc:
            raise ValueError(f"model.nce_idt needs model.input_nc == model.output_nc (the identity loss "
                             f"passes real B through the generator), got {self.input_nc}, {self.output_nc}")
        if self.netF not in HEADS:
            raise ValueError(f"model.netF must be one of {', '.join(HEADS)}, got {self.netF!r}")
        if not 0 <= self.lambda_gp < float("inf"):
            raise ValueError(f"model.lambda_gp must be a finite number >= 0, got {self.lambda_gp}")
        self._check_networks()
        if self.n_blocks < 1 or self.ngf < 1 or self.ndf < 1:
            raise ValueError("model.n_blocks, model.ngf and model.ndf must be positive")
        if list(self.nce_layers) != sorted(set(self.nce_layers)) or not self.nce_layers:
            raise ValueError(f"model.nce_layers must be ascending and distinct, got {self.nce_layers}")
        layers = generator_layer_count(self.n_blocks, self.antialias, self.antialias_up)
        if self.nce_layers[0] < 0 or self.nce_layers[-1] >= layers:
            raise ValueError(f"model.nce_layers must lie within the generator's layers 0..{layers - 1} "
                             f"(n_blocks {self.n_blocks}), got {list(self.nce_layers)}")
        if self.lambda_NCE < 0 or self.lambda_GAN < 0:
            raise ValueError("model.lambda_NCE and model.lambda_GAN must be >= 0")
        if self.num_patches < 1:
            raise ValueError(f"model.num_patches must be positive, got {self.num_patches}")

    def _check_networks(self) -> None:
        """netG, netD, the norms and the block count (resolved from netG when None)."""
        if self.netG not in GENERATORS:
            raise ValueError(f"model.netG must be one of {', '.join(GENERATORS)}, got {self.netG!r}")
        if self.netG in UNET_DOWNS:
            raise ValueError(
                f"model.netG {self.netG} cannot train CUT: the official UnetGenerator takes only the image "
                f"and has no feature layers for PatchNCE, so the official code fails on it; a U-Net "
                f"checkpoint still loads for translation (jobs.infer, jobs.export)"
            )
        if self.netD not in DISCRIMINATORS:
            raise ValueError(f"model.netD must be one of {', '.join(DISCRIMINATORS)}, got {self.netD!r}")
        for name in ("normG", "normD"):
            if getattr(self, name) not in NORM_TYPES:
                raise ValueError(f"model.{name} must be one of {', '.join(NORM_TYPES)}, "
                                 f"got {getattr(self, name)!r}")
        if self.netD == "n_layers" and self.n_layers_D < 1:
            raise ValueError(f"model.n_layers_D must be at least 1, got {self.n_layers_D}")
        if self.netD != "n_layers" and self.n_layers_D != 3:
            raise ValueError(f"model.n_layers_D {self.n_layers_D} is used only with model.netD n_layers "
                             f"(netD {self.netD} has a fixed depth); set model.netD=n_layers or leave it 3")
        if self.n_blocks is None:
            object.__setattr__(self, "n_blocks", RESNET_BLOCKS[self.netG])

    @property
    def reuses_keys(self) -> bool:
        """Whether the PatchNCE keys come from the translating forward pass (``reuse_keys``). Only
        where that equals encoding the source again: with batch norm the statistics of the batch
        differ, and with dropout the masks do, so those take the official path."""
        return self.reuse_keys and self.normG != "batch" and self.no_dropout

    @classmethod
    def from_preset(cls, preset: str = "CUT", **overrides: Any) -> CUTConfig:
        """The official preset ``preset`` (CUT or FastCUT) with explicit ``overrides`` on top."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        values = {**PRESETS[preset], **overrides, "preset": preset}
        if "nce_layers" in values:
            values["nce_layers"] = tuple(int(i) for i in values["nce_layers"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["nce_layers"] = list(self.nce_layers)
        return out


def _channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


class ThreeNetworkModel:
    """What CUT's and SinCUT's models share: G, D and F with one Adam each and the step's RNG
    (``self.generator``); subclasses build the networks, then call ``_make_optimizers``."""

    family = "CUT"  # names the kind of training state in errors
    config: Any
    device: torch.device
    netG: nn.Module
    netD: nn.Module
    netF: nn.Module
    generator: torch.Generator

    def _make_optimizers(self, lr: float, beta1: float, beta2: float) -> None:
        # The fused kernel computes Adam's update in one pass per tensor (CPU: 10 ms instead of 76 ms
        # per step for G's 11.4M parameters); the update is the same as the loop implementation's.
        adam: dict[str, Any] = {"lr": lr, "betas": (beta1, beta2)}
        if self.device.type in ("cpu", "cuda"):
            adam["fused"] = True
        self.opt_G = torch.optim.Adam(self.netG.parameters(), **adam)
        self.opt_D = torch.optim.Adam(self.netD.parameters(), **adam)
        # One explicit group, so that the parameterless heads (netF sample, reshape) get an optimizer
        # too: it steps nothing, and every state keeps the same three optimizers.
        self.opt_F = torch.optim.Adam([{"params": list(self.netF.parameters())}], **adam)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.opt_G, self.opt_D, self.opt_F)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of all three optimizers (the official schedule shares one)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs: networks, optimizers, the step's RNG and the config."""
        return {
            "config": self.config.to_dict(),
            "G": self.netG.state_dict(),
            "D": self.netD.state_dict(),
            "F": self.netF.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "opt_F": self.opt_F.state_dict(),
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; a state of another architecture is a clear ValueError."""
        missing = [k for k in ("G", "D", "F", "opt_G", "opt_D", "opt_F", "rng") if k not in state]
        if missing:
            raise ValueError(f"training state lacks {missing}; is this a {self.family} training checkpoint?")
        load_strict(self.netG, state["G"], "G")
        load_strict(self.netD, state["D"], "D")
        load_strict(self.netF, state["F"], "F")
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.opt_F.load_state_dict(state["opt_F"])
        self.generator.set_state(state["rng"])

    def parameters(self) -> Iterator[nn.Parameter]:
        for net in (self.netG, self.netD, self.netF):
            yield from net.parameters()

    def _with_nce(self, losses: dict[str, torch.Tensor], loss_G: torch.Tensor,
                  terms: list[torch.Tensor]) -> torch.Tensor:
        """G's loss with the PatchNCE terms (recorded in ``losses``): with the identity term, the
        official 0.5 * (NCE + NCE_Y)."""
        losses["NCE"] = terms[0]
        if not self.config.nce_idt:
            return loss_G + terms[0]
        losses["NCE_Y"] = terms[1]
        return loss_G + 0.5 * (terms[0] + terms[1])

    def _finish_step(self, loss_G: torch.Tensor, losses: dict[str, torch.Tensor], real_A: torch.Tensor,
                     real_B: torch.Tensor, fake: torch.Tensor, sync: bool) -> dict[str, Any]:
        """G and F step on ``loss_G`` (F only where PatchNCE trained it), D's gradients back on, the
        step's visuals kept; returns the losses (floats, or 0-d tensors if not ``sync``)."""
        losses["G"] = loss_G
        loss_G.backward()
        self.opt_G.step()
        if self.config.lambda_NCE > 0:
            self.opt_F.step()
        self.opt_G.zero_grad(set_to_none=True)
        self.opt_F.zero_grad(set_to_none=True)
        self.netD.requires_grad_(True)

        n = real_A.shape[0]
        self.visuals = {"real_A": real_A, "fake_B": fake[:n].detach(), "real_B": real_B}
        if self.config.nce_idt:
            self.visuals["idt_B"] = fake[n:].detach()
        detached = {k: v.detach() for k, v in losses.items()}
        return {k: v.item() for k, v in detached.items()} if sync else detached


class CUTModel(ThreeNetworkModel):
    """Generator G, discriminator D, PatchNCE heads F, their Adam optimizers and the patch RNG.

    ``wrap`` lets a caller (the DDP job) put wrappers around G, D and F for the trainable passes;
    passes that need no gradient sync (D judging fakes for G, key heads) use the plain modules.
    """

    def __init__(self, config: CUTConfig, device: str | torch.device = "cpu", seed: int = 0) -> None:
        self.config = config
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.netG = ResnetGenerator(
                config.input_nc,
                config.output_nc,
                config.ngf,
                config.n_blocks,
                config.antialias,
                config.antialias_up,
                config.normG,
                not config.no_dropout,
            )
            self.netD = define_discriminator(
                config.netD, config.output_nc, config.ndf, config.n_layers_D, config.normD, config.antialias
            )
            channels = self.netG.feature_channels(config.nce_layers)
            self.netF = define_head(config.netF, channels, config.netF_nc)
            for net in (self.netG, self.netD, self.netF):
                init_weights(net, config.init_gain, config.init_type)
        # The official networks with their layers' fast forms swapped in (same parameters and keys).
        self.netG, self.netD = accelerate(self.netG), accelerate(self.netD)
        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        for net in (self.netG, self.netD, self.netF):
            net.to(device=self.device, memory_format=memory_format)
        self._make_optimizers(config.lr, config.beta1, config.beta2)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self._G: nn.Module = self.netG
        self._D: nn.Module = self.netD
        self._F: nn.Module = self.netF
        self.visuals: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------- setup
    def wrap(self, wrapper: Callable[[nn.Module], nn.Module], sync_batch_norm: bool = False) -> None:
        """Use ``wrapper(net)`` (e.g. DistributedDataParallel) for the passes that train G, D and F.

        ``sync_batch_norm`` first turns every BatchNorm2d into a SyncBatchNorm, so that batch norm
        sees the global batch across ranks (torch supports it on GPUs only). The converted layers keep
        the same parameters and buffers, so the optimizers and state dicts are unchanged.
        """
        if sync_batch_norm:
            self.netG = nn.SyncBatchNorm.convert_sync_batchnorm(self.netG)
            self.netD = nn.SyncBatchNorm.convert_sync_batchnorm(self.netD)
        self._G, self._D = wrapper(self.netG), wrapper(self.netD)
        # A head without parameters has nothing to synchronise (and DDP refuses such a module).
        self._F = wrapper(self.netF) if any(True for _ in self.netF.parameters()) else self.netF

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------ step
    def train_step(
        self,
        real_A: torch.Tensor,
        real_B: torch.Tensor,
        patch_ids: PatchIds | None = None,
        sync: bool = True,
    ) -> dict[str, Any]:
        """One D update then one G+F update; returns the losses (floats, or 0-d tensors if not sync).

        ``patch_ids`` (one id tensor per NCE layer) replaces the sampled patch positions for both
        NCE terms, for tests and parity checks.
        """
        cfg = self.config
        self.netG.check_input(real_A)
        self.netG.check_input(real_B)
        real_A = _channels_last(real_A.to(self.device, non_blocking=True), cfg.channels_last)
        real_B = _channels_last(real_B.to(self.device, non_blocking=True), cfg.channels_last)
        n = real_A.shape[0]
        flipped = cfg.flip_equivariance and bool(torch.rand((), generator=self.generator) < 0.5)
        if cfg.nce_idt and real_A.shape[2:] != real_B.shape[2:]:
            raise ValueError(f"model.nce_idt passes A and B through the generator together (as the official "
                             f"step does), so they must share a size: got A {tuple(real_A.shape[2:])} and "
                             f"B {tuple(real_B.shape[2:])}; crop them (data.preprocess ..._and_crop) or set "
                             f"model.nce_idt=false")
        real = torch.cat([real_A, real_B]) if cfg.nce_idt else real_A
        if flipped:
            real = real.flip(3)
        with self._autocast():
            fake, feats_real = self._G(real, cfg.nce_layers)
        fake_B = fake[:n]

        # D update: fake and real judged in one batched pass where images stay independent (instance
        # norm, or none) and share a size; batch norm's statistics need the official two passes, fakes
        # first.
        self.netD.requires_grad_(True)
        with self._autocast():
            if cfg.normD == "batch" or fake_B.shape[2:] != real_B.shape[2:]:
                pred_fake, pred_real = self._D(fake_B.detach()), self._D(real_B)
            else:
                pred = self._D(torch.cat([fake_B.detach(), real_B]))
                pred_fake, pred_real = pred[:n], pred[n:]
        loss_D_fake = gan_loss(pred_fake, False, cfg.gan_mode)
        loss_D_real = gan_loss(pred_real, True, cfg.gan_mode)
        loss_D = 0.5 * (loss_D_fake + loss_D_real)
        if cfg.lambda_gp > 0:
            loss_D_GP = cfg.lambda_gp * self._gradient_penalty(real_B, fake_B.detach())
            loss_D = loss_D + loss_D_GP
        loss_D.backward()
        self.opt_D.step()
        # Gradients are freed as soon as they are applied, so none sit in memory through the other
        # network's backward pass.
        self.opt_D.zero_grad(set_to_none=True)

        # G and F update against the updated D, which needs no gradient of its own here.
        self.netD.requires_grad_(False)
        with self._autocast():
            loss_G_GAN = gan_loss(self.netD(fake_B), True, cfg.gan_mode) * cfg.lambda_GAN
        losses: dict[str, torch.Tensor] = {
            "G_GAN": loss_G_GAN,
            "D_real": loss_D_real,
            "D_fake": loss_D_fake,
        }
        if cfg.lambda_gp > 0:
            losses["D_GP"] = loss_D_GP
        loss_G = loss_G_GAN
        if cfg.lambda_NCE > 0:
            source = real_A if not cfg.nce_idt else torch.cat([real_A, real_B])
            terms = self._nce_terms(source, fake, feats_real, flipped, patch_ids)
            loss_G = self._with_nce(losses, loss_G, terms)
        return self._finish_step(loss_G, losses, real_A, real_B, fake, sync)

    def _gradient_penalty(self, real_B: torch.Tensor, fake_B: torch.Tensor) -> torch.Tensor:
        """The WGAN-GP term (unweighted) on real/fake mixes, one mixing weight per image drawn from the
        model's RNG (so a resumed run draws the same). The plain D runs it: DDP does not support
        ``autograd.grad``; the penalty's gradient still reaches D's parameters through loss_D."""
        alpha = torch.rand(real_B.shape[0], 1, 1, 1, generator=self.generator).to(real_B.device, real_B.dtype)
        with self._autocast(), plain_operators():  # the fast blur/Winograd kernels lack 2nd derivatives
            return gradient_penalty(self.netD, real_B, fake_B, alpha)

    def _nce_terms(
        self,
        source: torch.Tensor,
        fake: torch.Tensor,
        feats_real: list[torch.Tensor],
        flipped: bool,
        patch_ids: PatchIds | None,
    ) -> list[torch.Tensor]:
        """PatchNCE between each source image and its translation: [NCE(A -> fake_B), NCE(B -> idt_B)].

        ``source`` is real_A (or real_A and real_B stacked) unflipped; ``fake`` is G's output for the
        (possibly flipped) source. Returns one term per group of the stack.
        """
        cfg = self.config
        layers = cfg.nce_layers
        groups = 2 if cfg.nce_idt else 1
        if cfg.reuses_keys:
            with torch.no_grad(), self._autocast():
                # Keys must see the unflipped source: reuse the forward's features unless it was flipped.
                feats_k = self.netG(source, layers, encode_only=True) if flipped else feats_real
            with self._autocast():
                feats_q = self._G(fake, layers, encode_only=True)
            if flipped:
                feats_q = [f.flip(3) for f in feats_q]
            ids = self._patch_ids(feats_k, groups, patch_ids)
            with torch.no_grad(), self._autocast():
                keys = self.netF(feats_k, ids)
            with self._autocast():
                queries = self._F(feats_q, ids)
        else:
            keys, queries = self._reencoded_keys_and_queries(source, fake, flipped, patch_ids)
        terms = []
        per_group = source.shape[0] // groups
        for g in range(groups):
            total = 0.0
            for q, k in zip(queries, keys, strict=True):
                rows = q.shape[0] // groups
                part = slice(g * rows, (g + 1) * rows)
                loss = patch_nce_loss(
                    q[part], k[part], per_group, cfg.nce_T, cfg.nce_includes_all_negatives_from_minibatch
                )
                total = total + (loss * cfg.lambda_NCE).mean()
            terms.append(total / len(layers))
        return terms

    def _patch_ids(
        self, feats: list[torch.Tensor], groups: int, given: PatchIds | None
    ) -> list[torch.Tensor]:
        """Ids per layer: the given ones, or one draw per group (A and B terms sample separately)."""
        if given is not None:
            return [ids.to(f.device) for ids, f in zip(given, feats, strict=True)]
        n = feats[0].shape[0] // groups
        draws = [sample_patch_ids(feats, self.config.num_patches, self.generator) for _ in range(groups)]
        if groups == 1:
            return draws[0]
        return [torch.cat([d[i].expand(n, -1) for d in draws]) for i in range(len(feats))]

    def _reencoded_keys_and_queries(
        self, source: torch.Tensor, fake: torch.Tensor, flipped: bool, patch_ids: PatchIds | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The official key path: encode each source and output image again, autograd on throughout."""
        cfg = self.config
        groups = 2 if cfg.nce_idt else 1
        keys: list[list[torch.Tensor]] = []
        queries: list[list[torch.Tensor]] = []
        for src, tgt in zip(source.chunk(groups), fake.chunk(groups), strict=True):
            with self._autocast():
                feat_q = self._G(tgt, cfg.nce_layers, encode_only=True)
                if flipped:
                    feat_q = [f.flip(3) for f in feat_q]
                feat_k = self._G(src, cfg.nce_layers, encode_only=True)
                ids = self._patch_ids(feat_k, 1, patch_ids)
                keys.append(self._F(feat_k, ids))
                queries.append(self._F(feat_q, ids))
        return [torch.cat(ks) for ks in zip(*keys, strict=True)], [
            torch.cat(qs) for qs in zip(*queries, strict=True)
        ]

    # ------------------------------------------------------------------------------------ inference
    @torch.inference_mode()
    def translate(self, real_A: torch.Tensor) -> torch.Tensor:
        """G(real_A), no flip and no identity batch (the official test-time forward), in eval mode as
        exported generators translate: batch norm with its running statistics, no dropout."""
        x = _channels_last(real_A.to(self.device), self.config.channels_last)
        was_training = self.netG.training
        self.netG.eval()
        try:
            with self._autocast():
                return self.netG(x).float()
        finally:
            self.netG.train(was_training)

