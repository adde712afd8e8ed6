"""CUT losses: the GAN objectives and the patch-wise contrastive PatchNCE loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GAN_MODES = ("lsgan", "vanilla", "nonsaturating", "wgangp")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) tensors are promoted: losses and NCE logits are computed in fp32."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def gan_loss(prediction: torch.Tensor, target_is_real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Mean GAN loss of discriminator logits against the real (1) or fake (0) label, in fp32.

    ``wgangp`` is the Wasserstein critic loss: minus the mean prediction for real, plus it for fake
    (docs/official-reference.md §18); its gradient penalty is ``gradient_penalty``, weighted apart."""
    pred = at_least_fp32(prediction)
    if mode == "lsgan":
        target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
        return F.mse_loss(pred, target)
    if mode == "vanilla":
        target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
        return F.binary_cross_entropy_with_logits(pred, target)
    if mode == "nonsaturating":
        per_sample = F.softplus(-pred if target_is_real else pred).flatten(1).mean(dim=1)
        return per_sample.mean()
    if mode == "wgangp":
        return -pred.mean() if target_is_real else pred.mean()
    raise ValueError(f"unknown gan_mode {mode!r}; expected one of {GAN_MODES}")


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    alpha: torch.Tensor,
    constant: float = 1.0,
) -> torch.Tensor:
    """The WGAN-GP penalty, unweighted: mean over images of (||grad_x critic(x)||_2 - constant)^2.

    x = alpha * real + (1 - alpha) * fake, one ``alpha`` per image (shape (N, 1, 1, 1), the official
    'mixed' type); the norm is over all of an image's gradient, taken after adding 1e-16 to every
    element as the official code does. The graph is kept (create_graph), so the penalty trains the
    critic. ``fake`` should be detached.
    """
    x = (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True)
    norms = (at_least_fp32(grad).flatten(1) + 1e-16).norm(2, dim=1)
    return ((norms - constant) ** 2).mean()


def patch_nce_loss(
    feat_q: torch.Tensor,
    feat_k: torch.Tensor,
    batch_size: int,
    temperature: float = 0.07,
    negatives_from_minibatch: bool = False,
) -> torch.Tensor:
    """Per-patch InfoNCE loss, a vector of length N*P.

    ``feat_q`` (queries, from the generated image) and ``feat_k`` (keys, from the source image) are
    L2-normalised (N*P, C) rows, batch-major. The positive of a query is the key at the same row;
    negatives are the other keys of the same image (or of the whole minibatch). Keys get no gradient.
    The positive pair's slot among the negatives is filled with -10, as in the official code.
    """
    q = at_least_fp32(feat_q)
    k = at_least_fp32(feat_k.detach())
    rows, dim = q.shape
    l_pos = (q * k).sum(dim=1, keepdim=True)
    groups = 1 if negatives_from_minibatch else batch_size
    if rows % groups:
        raise ValueError(f"{rows} patch rows cannot be split into {groups} images")
    qg = q.view(groups, -1, dim)
    kg = k.view(groups, -1, dim)
    npatches = qg.shape[1]
    l_neg = torch.bmm(qg, kg.transpose(2, 1))
    diagonal = torch.eye(npatches, device=q.device, dtype=torch.bool)[None]
    l_neg = l_neg.masked_fill(diagonal, -10.0).view(-1, npatches)
    logits = torch.cat((l_pos, l_neg), dim=1) / temperature
    target = torch.zeros(rows, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction="none")
