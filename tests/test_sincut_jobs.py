"""SinCUT through the jobs: config preset, jobs.train on two single images (exact resume after SIGTERM),
jobs.infer at full resolution, official generator state dicts, jobs.export's refusal of decoder noise."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import assert_states_equal, final_state, run, start, wait_for

from cut import CheckpointError, generator_from_checkpoint, read_checkpoint
from cut.checkpoint import infer_generator_architecture, model_card, to_bytes
from cut.sincut import SinCUTConfig, SinCUTModel
from cut.stylegan2 import StyleGAN2Generator
from jobs.config import ConfigError, TrainConfig, cut_config, load_config, resolve_train_config, sincut_config
from jobs.finetune import init_generator
from pipeline.single_image import SingleImage, SingleImageStream
from pipeline.unpaired import StreamPosition

ROOT = Path(__file__).resolve().parent.parent
URLS = ["data.a=a.png", "data.b=b.png", "run.url=run"]
# A tiny SinCUT: narrow nets, 32-pixel crops (the smallest the discriminator's head takes with one
# downsampling and the official channel tables), 4 crops a step, epochs of 4 steps.
TINY = ["model.ngf=2", "model.ndf=4", "model.netF_nc=16", "data.crop_size=32", "train.batch_size=4",
        "data.crops_per_epoch=16", "train.n_epochs=2", "train.n_epochs_decay=2", "train.log_every=2",
        "train.image_every=2", "data.workers=2"]


def sincut_config_of(*overrides: str) -> TrainConfig:
    return resolve_train_config(load_config(TrainConfig, str(ROOT / "configs" / "sincut.yaml"),
                                            [*URLS, *overrides]))


def test_sincut_yaml_is_the_official_sincut_preset():
    config = sincut_config_of()
    assert cut_config(config, "cuda") == SinCUTConfig()  # every value as cut/sincut.py's defaults
    assert (config.train.n_epochs, config.train.n_epochs_decay) == (8, 8)
    image = SingleImage("x", Image.new("RGB", (80, 70)))
    stream = SingleImageStream(image, image, config.train.batch_size, config.data.crop_size,
                               config.data.crops_per_epoch, seed=0)
    assert stream.steps_per_epoch == 6250  # 100,000 crops of 16 (docs/official-reference.md §20)
    narrow = cut_config(sincut_config_of("model.ngf=4", "data.crop_size=32", "train.lr=0.001"), "cpu")
    assert (narrow.ngf, narrow.crop_size, narrow.lr, narrow.num_patches) == (4, 32, 0.001, 1)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.normG=batch", "model.normG"),
        ("model.n_blocks=6", "model.n_blocks"),
        ("model.bf16=true", "model.bf16"),
        ("model.flip_equivariance=true", "model.flip_equivariance"),
        ("model.netG=resnet_9blocks", "model.netG"),
        ("model.netD=basic", "model.netD"),
        ("model.input_nc=1", "model.input_nc"),
        ("data.preprocess=resize_and_crop", "data.preprocess"),
        ("data.crop_size=48", "data.crop_size"),
        ("data.crops_per_epoch=8", "data.crops_per_epoch"),
        ("model.nce_layers=[0,2,9]", "model.nce_layers"),
    ],
)
def test_sincut_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        sincut_config_of(override)


def test_crops_depend_only_on_the_position_not_on_threads_or_where_the_stream_started():
    rng = np.random.default_rng(0)
    a = SingleImage("a", Image.fromarray((rng.random((56, 72, 3)) * 255).astype(np.uint8)))
    b = SingleImage("b", Image.fromarray((rng.random((80, 64, 3)) * 255).astype(np.uint8)))
    serial = SingleImageStream(a, b, 3, 32, 15, seed=5)
    threaded = SingleImageStream(a, b, 3, 32, 15, seed=5, workers=2)
    whole = list(serial.iterate(StreamPosition(1, 0)))
    tail = list(threaded.iterate(StreamPosition(1, 2)))
    assert len(whole) == 5 and len(tail) == 3
    for x, y in zip(whole[2:], tail, strict=True):
        assert torch.equal(x["A"], y["A"]) and torch.equal(x["B"], y["B"])
    assert not torch.equal(whole[0]["A"], whole[1]["A"])
    assert not torch.equal(whole[0]["A"], next(serial.iterate(StreamPosition(0, 0)))["A"])


def _official_generator(n_blocks: int = 6, inject_noise: bool = True) -> StyleGAN2Generator:
    torch.manual_seed(0)
    net = StyleGAN2Generator(3, 3, 10, n_blocks, 1, 64, inject_noise)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.5)  # trained noise strength (it starts at 0)
    return net


def test_official_sincut_generator_state_dict_loads_strictly_with_fixed_noise():
    net = _official_generator()
    state = read_checkpoint(to_bytes({f"module.{k}": v for k, v in net.state_dict().items()}))
    assert len(state) == 39  # the official latest_net_G.pth of SinCUT (§20)
    arch = infer_generator_architecture({k[7:]: v for k, v in state.items()})
    assert arch == {"input_nc": 3, "output_nc": 3, "ngf": 10, "n_blocks": 6, "num_downsampling": 1,
                    "resolution": 64, "inject_noise": True}
    loaded = generator_from_checkpoint(state, "latest_net_G.pth")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = torch.rand(2, 3, 56, 72) * 2 - 1
    with torch.no_grad():
        first, again, alone = loaded(x), loaded(x), loaded(x[1:])
        noisy = net(x)  # training-time noise: the global RNG
    assert torch.equal(first, again)  # inference noise is fixed
    assert torch.allclose(first[1:], alone, atol=1e-6)  # ... and the same for an image wherever it sits
    assert not torch.allclose(first, noisy, atol=1e-4)  # the noise does matter
    small = generator_from_checkpoint(_official_generator(2, False).state_dict())
    assert small.architecture["n_blocks"] == 2 and not small.architecture["inject_noise"]
    del state["module.decoder.convs.3.noise.weight"]
    with pytest.raises(CheckpointError, match="missing 1 keys"):
        generator_from_checkpoint(state, "latest_net_G.pth")


def test_init_from_a_sincut_state_whose_widths_leave_its_architecture_ambiguous(tmp_path):
    """A tiny SinCUT G (ngf 2, 32-px crops) has the widths of ngf 4 at resolution 64: a state dict
    cannot tell them apart, so fitting is judged by the tensors, which match."""
    trained = SinCUTModel(sincut_config(sincut_config_of(*TINY)), seed=1).netG
    (tmp_path / "latest_net_G.pth").write_bytes(to_bytes(trained.state_dict()))
    inferred = infer_generator_architecture(trained.state_dict())
    configured = trained.architecture
    assert (inferred["ngf"], inferred["resolution"]) != (configured["ngf"], configured["resolution"])
    fresh = SinCUTModel(sincut_config(sincut_config_of(*TINY)), seed=2).netG
    record = init_generator(fresh, str(tmp_path / "latest_net_G.pth"))
    assert record["file"].endswith("latest_net_G.pth")
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in fresh.state_dict().items())
    wider = SinCUTModel(sincut_config(sincut_config_of(*TINY, "model.ngf=4")), seed=2).netG
    # the checkpoint's shape, then the configured one
    shapes = r"encoder\.convs\.1\.0\.weight \(32, 3, 1, 1\) != \(64, 3, 1, 1\)"
    with pytest.raises(CheckpointError, match=shapes):
        init_generator(wider, str(tmp_path / "latest_net_G.pth"))


def test_export_refuses_the_noisy_generator_and_exports_the_small_one(tmp_path):
    from jobs import export

    for name, net in (("noisy", _official_generator()), ("small", _official_generator(2, False))):
        (tmp_path / f"{name}.pth").write_bytes(to_bytes(net.state_dict()))
    code = export.main(["--checkpoint", str(tmp_path / "noisy.pth"), "--out", str(tmp_path / "x"),
                        "--format", "onnx", "--size", "32"])
    assert code == 1 and not (tmp_path / "x").exists()
    pytest.importorskip("onnxruntime")
    code = export.main(["--checkpoint", str(tmp_path / "small.pth"), "--out", str(tmp_path / "onnx"),
                        "--format", "onnx", "--size", "32"])
    assert code == 0 and (tmp_path / "onnx" / "generator.onnx").exists()


# ------------------------------------------------------------------------------------------- jobs
def _images(tmp_path: Path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((56, 72, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")  # 72x56
    y, x = np.mgrid[0:80, 0:64]
    Image.fromarray(np.stack([x * 3, y * 3, x + y], -1).astype(np.uint8)).save(tmp_path / "b.png")
    return str(tmp_path / "a.png"), str(tmp_path / "b.png")


def sincut_train(a: str, b: str, run_url: str, *overrides: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "jobs.train", "--config", "configs/sincut.yaml", f"data.a={a}",
            f"data.b={b}", f"run.url={run_url}", *TINY, *overrides]


def infer(checkpoint: str, source: str, out: str) -> Image.Image:
    """jobs.infer's main in this process (tests/inprocess.py); the translated image."""
    from inprocess import run_main

    from jobs.infer import main as infer_main

    done = run_main(infer_main, "--checkpoint", checkpoint, "--input", source, "--out", out, "--preprocess",
                    "none", "--no-progress")
    assert done.returncode == 0, done.stderr
    (image,) = Path(out, "images").rglob("*.png")
    return Image.open(image)


@pytest.mark.slow
def test_sincut_run_resumes_exactly_after_sigterm_and_translates_at_full_size(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b = _images(tmp_path)
    settings = ["train.max_steps=14", "train.checkpoint_every=5"]
    reference = run(sincut_train(a, b, str(tmp_path / "ref"), *settings))
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "stopped"
    log = tmp_path / "stopped.log"
    proc = start(sincut_train(a, b, str(run_dir), *settings), log)
    wait_for(lambda: "step 2/" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()
    assert "stop requested (SIGTERM), checkpoint saved" in log.read_text()
    stopped_at = final_state(str(run_dir))["step"]
    assert 2 <= stopped_at < 14
    resumed = run(sincut_train(a, b, str(run_dir), *settings))
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}: resumed from" in resumed.stderr
    state = final_state(str(run_dir))
    assert_states_equal(final_state(str(tmp_path / "ref")), state)

    card = state["card"]
    assert card["preset"] == "SinCUT" and card["architecture"]["ngf"] == 2
    assert card["data"]["a_images"] == 1 and "zoom_and_patch" in card["preprocess"]
    export = read_checkpoint((run_dir / "export" / "generator.pt").read_bytes())
    assert model_card(export)["step"] == 14
    ours = generator_from_checkpoint(export)
    official_bytes = (run_dir / "export" / "latest_net_G.pth").read_bytes()
    official = generator_from_checkpoint(read_checkpoint(official_bytes))
    assert ours.architecture == card["architecture"]
    x = torch.rand(1, 3, 56, 72) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours(x), official(x))  # widths fix the network: (ngf, resolution) may differ
    events = EventAccumulator(str(tmp_path / "ref" / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"loss/D_R1", "loss/idt", "loss/NCE", "loss/NCE_Y", "loss/G_GAN"} <= set(events.Tags()["scalars"])
    assert {"images/real_A", "images/fake_B", "images/idt_B"} <= set(events.Tags()["images"])

    out = infer(str(run_dir), a, str(tmp_path / "out"))
    assert out.size == (72, 56)
    again = infer(str(run_dir / "export" / "generator.pt"), a, str(tmp_path / "out2"))
    assert np.array_equal(np.asarray(out), np.asarray(again))  # the decoder's noise is fixed


@pytest.mark.slow
def test_sincut_run_with_periodic_evaluation_keeps_the_best_checkpoint(tmp_path):
    from cut.domain import export_classifier, train_domain_classifier

    a, b = _images(tmp_path)
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(held_out / f"{i}.png")
    g = torch.Generator().manual_seed(0)
    flat, noisy = torch.zeros(8, 3, 64, 64), torch.rand(8, 3, 64, 64, generator=g) * 2 - 1
    classifier = train_domain_classifier(flat, noisy, epochs=2, batch_size=8)
    (tmp_path / "domain.pt").write_bytes(to_bytes(export_classifier(classifier, test_accuracy=1.0)))
    run_dir = tmp_path / "run"
    done = run(sincut_train(a, b, str(run_dir), "train.max_steps=4", "eval.every=2", f"eval.a={held_out}",
                            f"eval.domain_classifier={tmp_path / 'domain.pt'}"))
    assert done.returncode == 0, done.stderr
    assert "step 2: evaluation count=3" in done.stderr and "step 4: evaluation count=3" in done.stderr
    best = read_checkpoint((run_dir / "checkpoints" / "best" / "state.pt").read_bytes())
    assert best["step"] in (2, 4) and best["card"]["preset"] == "SinCUT"


@pytest.mark.slow
def test_sincut_on_a_real_horse_and_zebra_learns(tmp_path, dataset):
    horse2zebra = dataset("horse2zebra")
    horse = sorted((horse2zebra / "trainA").glob("*.jpg"))[0]
    zebra = sorted((horse2zebra / "trainB").glob("*.jpg"))[0]
    run_dir = tmp_path / "run"
    done = run(sincut_train(str(horse), str(zebra), str(run_dir), "train.max_steps=40",  # TINY's ngf=2
                            "train.log_every=5", "data.crops_per_epoch=4000", "train.checkpoint_every=40"))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if " NCE=" in line]
    logged = [dict(re.findall(r"(\w+)=([\d.]+)", line)) for line in lines]
    assert len(logged) == 8
    for loss in ("idt", "NCE"):
        assert float(logged[-1][loss]) < 0.8 * float(logged[0][loss]), (loss, logged)
    source = Image.open(horse).convert("RGB")
    out = infer(str(run_dir), str(horse), str(tmp_path / "out"))
    assert out.size == source.size
    change = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(source, dtype=np.float32)).mean()
    assert change > 2.0, change  # mean absolute change in 0..255 levels
