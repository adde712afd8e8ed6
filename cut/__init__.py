"""CUT and FastCUT in pure PyTorch: networks, losses and the training step. No I/O."""

from cut.checkpoint import (
    CheckpointError,
    export_generator,
    generator_from_checkpoint,
    model_card,
    official_state_dicts,
    read_checkpoint,
)
from cut.losses import gan_loss, patch_nce_loss
from cut.model import PRESETS, CUTConfig, CUTModel
from cut.networks import NCE_LAYERS, NLayerDiscriminator, PatchSampleF, PixelDiscriminator, ResnetGenerator
from cut.unet import UnetGenerator

__all__ = [
    "NCE_LAYERS",
    "PRESETS",
    "CUTConfig",
    "CUTModel",
    "CheckpointError",
    "NLayerDiscriminator",
    "PatchSampleF",
    "PixelDiscriminator",
    "ResnetGenerator",
    "UnetGenerator",
    "export_generator",
    "gan_loss",
    "generator_from_checkpoint",
    "model_card",
    "official_state_dicts",
    "patch_nce_loss",
    "read_checkpoint",
]
