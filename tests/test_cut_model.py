"""The CUT/FastCUT step: official presets, the fast key path, determinism, exact save and resume."""

import pytest
import torch

from cut import CUTConfig, CUTModel
from cut.checkpoint import read_checkpoint, to_bytes

TINY = {"ngf": 8, "ndf": 8, "n_blocks": 2, "netF_nc": 16, "num_patches": 16}


def tiny(preset="CUT", seed=0, **overrides):
    return CUTModel(CUTConfig.from_preset(preset, **{**TINY, **overrides}), seed=seed)


def batch(n=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.rand(
        n, 3, size, size, generator=g
    ) * 2 - 1


def flips_first_step(seed):
    """Whether a model seeded with ``seed`` flips its first FastCUT batch (same draw as the model)."""
    return bool(torch.rand((), generator=torch.Generator().manual_seed(seed + 1)) < 0.5)


def capture_grads(model) -> dict[int, torch.Tensor]:
    """Each parameter's gradient as accumulated, before the optimizer applies and frees it."""
    grads: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.clone()))
    return grads


def fixed_ids(model, size=32):
    feats = model.netG(torch.zeros(1, 3, size, size), model.config.nce_layers, encode_only=True)
    g = torch.Generator().manual_seed(123)
    return [torch.randperm(f.shape[2] * f.shape[3], generator=g)[:16] for f in feats]


def test_presets_equal_official_defaults():
    cut, fast = CUTConfig.from_preset("CUT"), CUTConfig.from_preset("FastCUT")
    assert (cut.nce_idt, cut.lambda_NCE, cut.flip_equivariance) == (True, 1.0, False)
    assert (fast.nce_idt, fast.lambda_NCE, fast.flip_equivariance) == (False, 10.0, True)
    for c in (cut, fast):
        assert c.nce_layers == (0, 4, 8, 12, 16) and c.nce_T == 0.07 and c.num_patches == 256
        assert (c.lr, c.beta1, c.beta2, c.gan_mode, c.lambda_GAN) == (2e-4, 0.5, 0.999, "lsgan", 1.0)
        assert (c.ngf, c.ndf, c.n_blocks, c.netF_nc, c.init_gain) == (64, 64, 9, 256, 0.02)
    assert CUTConfig.from_preset("FastCUT", lambda_NCE=1.0).lambda_NCE == 1.0


@pytest.mark.parametrize("bad", [{"preset": "cyclegan"}, {"gan_mode": "wgan"}, {"nce_layers": (4, 0)}])
def test_config_rejects_bad_values_naming_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        CUTConfig(**bad)


def test_heads_exist_before_the_first_step_and_are_optimised():
    m = tiny()
    assert len(m.netF.state_dict()) == 20
    assert {id(p) for p in m.opt_F.param_groups[0]["params"]} == {id(p) for p in m.netF.parameters()}


def test_step_returns_the_official_losses():
    a, b = batch()
    assert set(tiny("CUT").train_step(a, b)) == {"G_GAN", "D_real", "D_fake", "G", "NCE", "NCE_Y"}
    assert set(tiny("FastCUT").train_step(a, b)) == {"G_GAN", "D_real", "D_fake", "G", "NCE"}


@pytest.mark.parametrize("preset,seed", [("CUT", 0), ("FastCUT", 0), ("FastCUT", 2)])
def test_reused_keys_give_the_same_losses_and_gradients_as_reencoding(preset, seed):
    """The fast path (keys from G's forward pass, no autograd) equals the official re-encoding."""
    a, b = batch(2)
    fast, official = tiny(preset, seed), tiny(preset, seed, reuse_keys=False)
    grads_fast, grads_official = capture_grads(fast), capture_grads(official)
    ids = fixed_ids(fast)
    if preset == "FastCUT":
        assert {flips_first_step(0), flips_first_step(2)} == {True, False}  # both paths covered
    lf, lo = fast.train_step(a, b, patch_ids=ids), official.train_step(a, b, patch_ids=ids)
    assert lf == pytest.approx(lo, rel=1e-5, abs=1e-6)
    for name in ("netG", "netF", "netD"):
        params = zip(
            getattr(fast, name).named_parameters(), getattr(official, name).parameters(), strict=True
        )
        pairs = [(key, grads_fast[id(p)], grads_official[id(q)]) for (key, p), q in params]
        # Weights only: conv biases in front of an InstanceNorm have a zero true gradient (pure noise).
        for key, gf, go in pairs:
            if key.endswith("weight"):
                assert (gf - go).norm() <= 1e-5 * go.norm(), f"{name}.{key}"
        g_fast = torch.cat([gf.flatten() for _, gf, _ in pairs])
        g_official = torch.cat([go.flatten() for _, _, go in pairs])
        assert (g_fast - g_official).norm() <= 1e-5 * g_official.norm(), name


def test_fastcut_flip_keeps_fake_in_flipped_orientation_and_compares_unflipped():
    a, b = batch()
    m = tiny("FastCUT", seed=0 if flips_first_step(0) else 1)
    m.train_step(a, b)
    with torch.no_grad():
        before = m.netG(a.flip(3))
    torch.testing.assert_close(m.visuals["real_A"], a)
    assert m.visuals["fake_B"].shape == before.shape


def test_step_is_deterministic_from_the_seed():
    a, b = batch()
    m1, m2 = tiny(seed=3), tiny(seed=3)
    for _ in range(2):
        assert m1.train_step(a, b) == m2.train_step(a, b)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert tiny(seed=4).train_step(a, b) != tiny(seed=3).train_step(a, b)


def test_save_load_step_is_bitwise_identical():
    a, b = batch()
    m1 = tiny("FastCUT")
    for _ in range(2):
        m1.train_step(a, b)
    m2 = tiny("FastCUT", seed=99)
    m2.load_state_dict(read_checkpoint(to_bytes(m1.state_dict())))
    for _ in range(3):
        assert m1.train_step(a, b) == m2.train_step(a, b)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_of_another_architecture_is_a_clear_error():
    state = tiny().state_dict()
    with pytest.raises(ValueError, match=r"G: checkpoint does not match.*shape mismatch"):
        tiny(ngf=16).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        tiny().load_state_dict({"G": state["G"]})


def test_losses_decrease_on_a_fixed_batch():
    a, b = batch(seed=1)
    m = tiny("CUT", lr=1e-3)
    history = [m.train_step(a, b) for _ in range(40)]
    first = sum(h["NCE"] for h in history[:5]) / 5
    last = sum(h["NCE"] for h in history[-5:]) / 5
    assert last < 0.8 * first
    d_first = sum(h["D_real"] + h["D_fake"] for h in history[:5])
    assert sum(h["D_real"] + h["D_fake"] for h in history[-5:]) < d_first


@pytest.mark.parametrize("n", [1, 3])
def test_any_per_rank_batch_size(n):
    a, b = batch(n)
    losses = tiny().train_step(a, b)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_channels_last_matches_default_layout():
    a, b = batch()
    ids = fixed_ids(tiny())
    ref = tiny().train_step(a, b, patch_ids=ids)
    assert tiny(channels_last=True).train_step(a, b, patch_ids=ids) == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_bf16_autocast_tracks_fp32():
    a, b = batch()
    ids = fixed_ids(tiny())
    ref, low = tiny(), tiny(bf16=True)
    with torch.no_grad():
        torch.testing.assert_close(low.translate(a), ref.translate(a), atol=0.05, rtol=0)
    lr, ll = ref.train_step(a, b, patch_ids=ids), low.train_step(a, b, patch_ids=ids)
    assert ll["NCE"] == pytest.approx(lr["NCE"], rel=0.05)
    assert ll["NCE_Y"] == pytest.approx(lr["NCE_Y"], rel=0.05)


def test_unsync_step_returns_tensors_without_host_sync():
    a, b = batch()
    out = tiny().train_step(a, b, sync=False)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())


def test_step_rejects_inputs_the_generator_cannot_take():
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny().train_step(torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 30, 30))
