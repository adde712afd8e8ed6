"""PatchNCE and GAN losses compute the official formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from cut.losses import gan_loss, patch_nce_loss


def naive_patch_nce(q, k, batch, temperature):
    """Per patch: -log softmax of [q.k_pos, q.k_neg for the other patches of the same image]."""
    rows = q.shape[0]
    per_image = rows // batch
    out = []
    for r in range(rows):
        img = r // per_image
        logits = [float(q[r] @ k[r])]
        for j in range(img * per_image, (img + 1) * per_image):
            logits.append(-10.0 if j == r else float(q[r] @ k[j]))
        scaled = [v / temperature for v in logits]
        out.append(-scaled[0] + math.log(sum(math.exp(v) for v in scaled)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("batch", [1, 3])
def test_patch_nce_equals_naive_per_patch_computation(batch):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(batch * 6, 8, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(batch * 6, 8, dtype=torch.float64), dim=1)
    got = patch_nce_loss(q, k, batch_size=batch, temperature=0.07)
    torch.testing.assert_close(got.double(), naive_patch_nce(q, k, batch, 0.07), rtol=1e-5, atol=1e-5)


def test_patch_nce_negatives_from_minibatch_use_every_key():
    q = F.normalize(torch.randn(8, 4), dim=1)
    k = F.normalize(torch.randn(8, 4), dim=1)
    got = patch_nce_loss(q, k, batch_size=2, negatives_from_minibatch=True)
    torch.testing.assert_close(
        got.double(), naive_patch_nce(q.double(), k.double(), 1, 0.07), rtol=1e-4, atol=1e-4
    )


def test_patch_nce_gives_keys_no_gradient():
    q = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    patch_nce_loss(q, k, batch_size=1).sum().backward()
    assert q.grad is not None and k.grad is None


def test_patch_nce_rejects_rows_that_do_not_split_into_images():
    with pytest.raises(ValueError, match="cannot be split"):
        patch_nce_loss(torch.randn(5, 4), torch.randn(5, 4), batch_size=2)


def test_gan_losses():
    pred = torch.tensor([[0.2, -1.0], [3.0, 0.5]])
    assert gan_loss(pred, True).item() == pytest.approx(((pred - 1) ** 2).mean().item())
    assert gan_loss(pred, False).item() == pytest.approx((pred**2).mean().item())
    assert gan_loss(pred, True, "vanilla").item() == pytest.approx(
        F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred)).item()
    )
    assert gan_loss(pred, False, "nonsaturating").item() == pytest.approx(F.softplus(pred).mean().item())
    with pytest.raises(ValueError, match="gan_mode"):
        gan_loss(pred, True, "wgan")
