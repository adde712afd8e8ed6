"""The loss, head and direction options (docs/official-reference.md §18): wgangp and its gradient
penalty, the netF heads, negatives from the whole minibatch, model.direction and model.init_from."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import final_state

from cut import CheckpointError, CUTConfig, CUTModel, read_checkpoint
from cut.checkpoint import load_strict, to_bytes
from cut.fast.plain import plain_operators
from cut.heads import HEADS, ReshapeF, define_head
from cut.losses import gan_loss, gradient_penalty
from jobs.config import ConfigError, TrainConfig, cut_config, load_config, resolve_train_config
from jobs.runtime import Runtime
from jobs.train import Trainer
from pipeline.ingest import build_shards

TINY = {"ngf": 8, "ndf": 8, "n_blocks": 2, "netF_nc": 16, "num_patches": 16}
REQUIRED = ["data.a=/a", "data.b=/b", "run.url=/run"]


def tiny(preset: str = "CUT", **overrides) -> CUTModel:
    return CUTModel(CUTConfig.from_preset(preset, **{**TINY, **overrides}), seed=0)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def capture_grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient as accumulated in a step, before the optimizer applies and frees it."""
    grads: dict[str, torch.Tensor] = {}
    for name, p in net.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
    return grads


# -------------------------------------------------------------------------------------- wgangp, GP
def test_wgangp_is_minus_the_mean_for_real_and_plus_it_for_fake():
    pred = torch.tensor([[[[0.5, -2.0], [1.5, 4.0]]], [[[-1.0, 0.0], [3.0, 2.0]]]])  # mean 1.0
    assert gan_loss(pred, True, "wgangp").item() == -1.0
    assert gan_loss(pred, False, "wgangp").item() == 1.0


def test_gradient_penalty_of_a_linear_critic_is_its_weight_norm_minus_one_squared():
    w = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]]])  # |w| = 5 whatever x is
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    penalty = gradient_penalty(lambda x: (x * w).sum((1, 2, 3)), real, fake, torch.rand(3, 1, 1, 1))
    assert penalty.item() == pytest.approx((5.0 - 1.0) ** 2)


def test_gradient_penalty_mixes_real_and_fake_per_image_and_trains_the_critic():
    real = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    fake = torch.tensor([[[[3.0, 0.0]]], [[[2.0, 1.0]]]])
    alpha = torch.tensor([0.25, 0.5]).view(2, 1, 1, 1)
    scale = torch.tensor(0.75, requires_grad=True)
    # critic(x) = scale * |x|^2 / 2 per image: its gradient is scale * x, of norm |scale| * |x|
    penalty = gradient_penalty(lambda x: scale * (x**2).sum((1, 2, 3)) / 2, real, fake, alpha)
    mixes = [0.25 * torch.tensor([1.0, 2.0]) + 0.75 * torch.tensor([3.0, 0.0]),
             0.5 * torch.tensor([0.0, -1.0]) + 0.5 * torch.tensor([2.0, 1.0])]
    norms = [float(m.norm()) for m in mixes]
    assert norms == pytest.approx([math.hypot(2.5, 0.5), 1.0])
    expected = sum((0.75 * n - 1) ** 2 for n in norms) / 2
    assert penalty.item() == pytest.approx(expected)
    penalty.backward()  # d/dscale of mean (scale*n - 1)^2 = mean 2 (scale*n - 1) n: needs create_graph
    assert scale.grad.item() == pytest.approx(sum(2 * (0.75 * n - 1) * n for n in norms) / 2)


def test_wgangp_step_has_the_official_losses_plus_the_penalty_in_ds_gradient():
    m = tiny(gan_mode="wgangp", lambda_gp=10.0)
    real_A, real_B = images(2, seed=1), images(2, seed=2)
    G0, D0 = copy.deepcopy(m.netG), copy.deepcopy(m.netD)
    rng = torch.Generator()
    rng.set_state(m.generator.get_state())
    alpha = torch.rand(2, 1, 1, 1, generator=rng)  # CUT does not flip: the mix is the step's first draw
    grads = capture_grads(m.netD)
    losses = m.train_step(real_A, real_B)

    with torch.no_grad():
        fake_B = G0(torch.cat([real_A, real_B]))[:2]
    pred_fake, pred_real = D0(fake_B), D0(real_B)
    assert losses["D_fake"] == pytest.approx(pred_fake.mean().item(), abs=1e-6)
    assert losses["D_real"] == pytest.approx(-pred_real.mean().item(), abs=1e-6)
    with torch.no_grad():
        assert losses["G_GAN"] == pytest.approx(-m.netD(fake_B).mean().item(), abs=1e-6)  # updated D
    with plain_operators():
        penalty = gradient_penalty(D0, real_B, fake_B, alpha)
    assert losses["D_GP"] == pytest.approx(10 * penalty.item(), rel=1e-5)
    critic = 0.5 * (pred_fake.mean() - pred_real.mean())
    expected = torch.autograd.grad(critic + 10 * penalty, list(D0.parameters()), retain_graph=True)
    without_gp = torch.autograd.grad(critic, list(D0.parameters()))
    for (name, _), want in zip(D0.named_parameters(), expected, strict=True):
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(w, p, atol=1e-6) for w, p in zip(expected, without_gp, strict=True))


def test_no_penalty_by_default_as_the_official_cut():
    m = tiny(gan_mode="wgangp")
    assert m.config.lambda_gp == 0.0 and "D_GP" not in m.train_step(images(1), images(1, seed=1))


# ------------------------------------------------------------------------------------------- heads
def official_sample(feat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """PatchSampleF's sampling without its MLP, as the official forward does it (from §7)."""
    rows = feat.permute(0, 2, 3, 1).flatten(1, 2)[:, ids, :].flatten(0, 1)
    return rows / (rows.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7)


def official_reshape(feat: torch.Tensor) -> torch.Tensor:
    """ReshapeF's forward on one map: AdaptiveAvgPool2d(4), channels last, flattened, normalised."""
    rows = torch.nn.AdaptiveAvgPool2d(4)(feat).permute(0, 2, 3, 1).flatten(0, 2)
    return rows / (rows.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7)


FEATS = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
         torch.randn(2, 5, 6, 6, generator=torch.Generator().manual_seed(1))]
IDS = [torch.tensor([0, 9, 63, 17]), torch.tensor([35, 2, 7, 11])]


def test_mlp_sample_keys_are_the_officials():
    head = define_head("mlp_sample", [3, 5], nc=16)
    expected = {}
    for i, c in enumerate([3, 5]):
        expected |= {f"mlp_{i}.0.weight": (16, c), f"mlp_{i}.0.bias": (16,),
                     f"mlp_{i}.2.weight": (16, 16), f"mlp_{i}.2.bias": (16,)}
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected


def test_sample_head_is_the_normalised_sampled_features_and_has_no_state():
    head = define_head("sample", [3, 5], nc=16)
    assert head.state_dict() == {} and not list(head.parameters())
    load_strict(head, {}, "F")  # an official netF=sample checkpoint is an empty state dict
    for got, feat, ids in zip(head(FEATS, IDS), FEATS, IDS, strict=True):
        torch.testing.assert_close(got, official_sample(feat, ids))


def test_reshape_head_is_the_officials_pooled_grid_whatever_the_ids():
    head = define_head("reshape", [3, 5])
    assert isinstance(head, ReshapeF) and head.state_dict() == {} and not list(head.parameters())
    got = head(FEATS, IDS)
    assert [tuple(g.shape) for g in got] == [(32, 3), (32, 5)]
    for g, feat in zip(got, FEATS, strict=True):
        torch.testing.assert_close(g, official_reshape(feat))
    for a, b in zip(got, head(FEATS, [i.flip(0) for i in IDS]), strict=True):
        assert torch.equal(a, b)


def test_an_unknown_head_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.netF"):
        define_head("global_pool", [3])
    with pytest.raises(ValueError, match=r"model\.netF"):
        CUTConfig(netF="strided_conv")


@pytest.mark.parametrize("net_f", [h for h in HEADS if h != "mlp_sample"])
def test_parameterless_heads_train_save_and_resume(net_f):
    m = tiny(netF=net_f)
    assert m.netF.state_dict() == {} and m.opt_F.param_groups[0]["params"] == []
    wrapped: list[torch.nn.Module] = []
    m.wrap(lambda net: wrapped.append(net) or net)
    assert m.netF not in wrapped and m.netG in wrapped  # DDP refuses a module without parameters
    losses = m.train_step(images(2), images(2, seed=1))
    assert math.isfinite(losses["NCE"]) and math.isfinite(losses["NCE_Y"])
    other = tiny(netF=net_f)
    other.load_state_dict(read_checkpoint(to_bytes(m.state_dict())))
    for key, value in m.netG.state_dict().items():
        assert torch.equal(value, other.netG.state_dict()[key])


# --------------------------------------------------------------------------------- all negatives
def naive_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row InfoNCE where every key of the minibatch is a negative (its own slot -10), by loops."""
    out = []
    for i in range(q.shape[0]):
        logits = [q[i] @ k[i]] + [torch.tensor(-10.0) if j == i else q[i] @ k[j] for j in range(k.shape[0])]
        out.append(-torch.log_softmax(torch.stack(logits) / temperature, 0)[0])
    return torch.stack(out)


@pytest.mark.parametrize("all_negatives", [True, False])
def test_negatives_from_the_whole_minibatch_at_batch_2(all_negatives):
    m = tiny("FastCUT", flip_equivariance=False, nce_includes_all_negatives_from_minibatch=all_negatives)
    real_A, real_B = images(2, seed=3), images(2, seed=4)
    G0, F0 = copy.deepcopy(m.netG), copy.deepcopy(m.netF)
    feats = G0(torch.zeros(1, 3, 32, 32), m.config.nce_layers, encode_only=True)
    g = torch.Generator().manual_seed(7)
    ids = [torch.randperm(f.shape[2] * f.shape[3], generator=g)[:16] for f in feats]
    losses = m.train_step(real_A, real_B, patch_ids=ids)
    with torch.no_grad():
        fake_B = G0(real_A)
        keys = F0(G0(real_A, m.config.nce_layers, encode_only=True), ids)
        queries = F0(G0(fake_B, m.config.nce_layers, encode_only=True), ids)
    whole_batch = [naive_nce(q, k, 0.07).mean() for q, k in zip(queries, keys, strict=True)]
    per_image = [torch.cat([naive_nce(q[:16], k[:16], 0.07), naive_nce(q[16:], k[16:], 0.07)]).mean()
                 for q, k in zip(queries, keys, strict=True)]
    lambda_nce = m.config.lambda_NCE  # 10 for FastCUT
    want = lambda_nce * sum(whole_batch if all_negatives else per_image) / len(ids)
    other = lambda_nce * sum(per_image if all_negatives else whole_batch) / len(ids)
    assert losses["NCE"] == pytest.approx(want.item(), rel=1e-5)
    assert abs(want.item() - other.item()) > 1e-3  # the two choices do differ here


# ------------------------------------------------------------------------------------------ config
def test_config_keys_reach_the_model():
    config = resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [
        *REQUIRED, "model.netF=reshape", "model.gan_mode=wgangp", "model.lambda_gp=10",
        "model.nce_includes_all_negatives_from_minibatch=true", "model.direction=BtoA",
        "model.init_from=/g.pt",
    ]))
    model = cut_config(config, "cpu")
    assert (model.netF, model.gan_mode, model.lambda_gp) == ("reshape", "wgangp", 10.0)
    assert model.nce_includes_all_negatives_from_minibatch
    assert (config.model.direction, config.model.init_from) == ("BtoA", "/g.pt")
    plain = resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", REQUIRED))
    defaults = cut_config(plain, "cpu")
    assert (defaults.netF, defaults.lambda_gp, defaults.nce_includes_all_negatives_from_minibatch) == (
        "mlp_sample", 0.0, False)


@pytest.mark.parametrize("override, key", [
    ("model.netF=global_pool", "model.netF"),
    ("model.direction=btoa", "model.direction"),
    ("model.lambda_gp=-1", "model.lambda_gp"),
    ("model.gan_mode=wgan", "model.gan_mode"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, override]))


# ------------------------------------------------------------------------------ direction, init_from
def flat_shards(tmp_path: Path, name: str, n: int, level: int) -> str:
    """n images of one grey level (with a little noise), sharded: a domain recognisable in a batch."""
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    g = torch.Generator().manual_seed(level)
    for i in range(n):
        pixels = (level + torch.randint(0, 8, (40, 44, 3), generator=g)).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}-{i:02d}.png")
    out = str(tmp_path / name)
    build_shards([str(folder)], out, prefix=name, domain=name, max_count=3, workers=1, progress=False)
    return out


@pytest.fixture
def domains(tmp_path: Path) -> tuple[str, str]:
    return flat_shards(tmp_path, "A", 4, 20), flat_shards(tmp_path, "B", 3, 230)  # dark A, bright B


def trainer(a: str, b: str, run_url: str, *overrides: str) -> Trainer:
    config = resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [
        f"data.a={a}", f"data.b={b}", f"run.url={run_url}", "train.checkpoint_every=100", *overrides,
    ]))
    torch.manual_seed(config.train.seed)
    return Trainer(config, Runtime(0, 1, 0, torch.device("cpu")))


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_direction_picks_the_input_domain_and_the_card_records_it(tmp_path, domains, direction):
    run_url = str(tmp_path / "run")
    t = trainer(*domains, run_url, f"model.direction={direction}", "train.max_steps=1")
    assert t.run() == 0
    dark, bright = t.model.visuals["real_A"].mean() < -0.5, t.model.visuals["real_A"].mean() > 0.5
    assert (dark, bright) == ((True, False) if direction == "AtoB" else (False, True))
    assert (t.model.visuals["real_B"].mean() > 0.5) == (direction == "AtoB")
    export = read_checkpoint((tmp_path / "run" / "export" / "generator.pt").read_bytes())
    for card in (export["metadata"]["card"], final_state(run_url)["card"]):
        assert card["direction"] == direction
        assert card["input_domain"] == ("a" if direction == "AtoB" else "b")
        assert (card["data"]["a_images"], card["data"]["b_images"]) == (4, 3)  # per domain, not per role


def test_init_from_takes_only_the_generator_and_starts_at_step_0(tmp_path, domains, caplog):
    source = str(tmp_path / "source")
    assert trainer(*domains, source, "train.max_steps=2").run() == 0
    trained = final_state(source)["model"]

    for url in (source, f"{source}/export/latest_net_G.pth"):  # a run folder, an official G file
        t = trainer(*domains, str(tmp_path / "fresh"), f"model.init_from={url}")
        assert not t.resume() and t.apply_init_from(False)
        assert t.step == 0 and all(not o.state for o in t.model.optimizers)
        for key, value in trained["G"].items():
            assert torch.equal(t.model.netG.state_dict()[key], value), key
        fresh_D = CUTModel(t.model.config, seed=0).netD.state_dict()
        assert all(torch.equal(v, fresh_D[k]) for k, v in t.model.netD.state_dict().items())
        assert any(not torch.equal(v, trained["D"][k]) for k, v in t.model.netD.state_dict().items())

    run_url = str(tmp_path / "tuned")
    assert trainer(*domains, run_url, f"model.init_from={source}", "train.max_steps=2").run() == 0
    record = final_state(run_url)["card"]["init_from"]
    assert record["url"] == source and record["file"].endswith("step-000000002/state.pt")
    assert record["source_step"] == 2 and len(record["sha256"]) == 64

    tuned_G = final_state(run_url)["model"]["G"]
    resumed = trainer(*domains, run_url, f"model.init_from={source}", "train.max_steps=3")
    with caplog.at_level(logging.INFO, logger="jobs.train"):
        assert resumed.resume() and not resumed.apply_init_from(True)
    assert "model.init_from" in caplog.text and "ignored" in caplog.text
    assert all(torch.equal(resumed.model.netG.state_dict()[k], v) for k, v in tuned_G.items())
    assert resumed.card()["init_from"] == record  # the card still says where the run began


def test_init_from_a_generator_of_another_architecture_names_the_difference(tmp_path, domains):
    source = str(tmp_path / "source")
    assert trainer(*domains, source, "train.max_steps=1").run() == 0
    t = trainer(*domains, str(tmp_path / "narrow"), f"model.init_from={source}", "model.ngf=4")
    with pytest.raises(CheckpointError, match=r"ngf: checkpoint 8, config 4 \(model.ngf\)"):
        t.apply_init_from(False)
