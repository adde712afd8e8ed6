"""jobs.train end to end: torchrun with 2 gloo ranks, S3 runs, exact resume, preemption, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cut import generator_from_checkpoint, read_checkpoint
from pipeline import storage
from pipeline.ingest import build_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def shard_set(tmp_path: Path, out_url: str, name: str, n: int, seed: int) -> str:
    """n small images of one domain, sharded (3 per shard) into out_url."""
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = (torch.rand(40, 44, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}-{i:02d}.png")
    build_shards([str(folder)], out_url, prefix=name, domain=name, max_count=3, workers=1, progress=False)
    return out_url


@pytest.fixture
def data(tmp_path: Path) -> tuple[str, str]:
    return (
        shard_set(tmp_path, str(tmp_path / "A"), "A", 10, 0),
        shard_set(tmp_path, str(tmp_path / "B"), "B", 7, 1),
    )


def train_cmd(a: str, b: str, run: str, *overrides: str, ranks: int = 0, restarts: int = 0) -> list[str]:
    job = [
        "-m",
        "jobs.train",
        "--config",
        "configs/tiny.yaml",
        f"data.a={a}",
        f"data.b={b}",
        f"run.url={run}",
    ]
    if ranks:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        launcher += [f"--max-restarts={restarts}"]
        return [sys.executable, *launcher, *job, *overrides]
    return [sys.executable, *job, *overrides]


def train_here(a: str, b: str, run: str, *overrides: str) -> subprocess.CompletedProcess:
    """`run(train_cmd(a, b, run, *overrides))` without a process of its own: jobs.train's main in this
    process (tests/inprocess.py), for runs refused before training that need no process-level check."""
    from inprocess import run_main

    from jobs.train import main as train_main

    return run_main(train_main, *train_cmd(a, b, run, *overrides)[3:])


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the point the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def final_state(run_url: str) -> dict:
    ckpt = storage.join(run_url, "checkpoints")
    step = storage.read_bytes(storage.join(ckpt, "latest")).decode()
    return read_checkpoint(storage.read_bytes(storage.join(ckpt, step, "state.pt")))


def assert_states_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for net in ("G", "D", "F"):
        for key, value in a["model"][net].items():
            assert torch.equal(value, b["model"][net][key]), f"{net}.{key}"
    for opt in ("opt_G", "opt_D", "opt_F"):
        sa, sb = a["model"][opt]["state"], b["model"][opt]["state"]
        assert sa.keys() == sb.keys()
        for idx in sa:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(sa[idx][key], sb[idx][key]), f"{opt}[{idx}].{key}"
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"], strict=True))


def test_torchrun_two_ranks_with_data_and_run_on_s3(tmp_path, s3_url):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = shard_set(tmp_path, f"{s3_url}/A", "A", 10, 0)
    b = shard_set(tmp_path, f"{s3_url}/B", "B", 7, 1)
    run_url = f"{s3_url}/run"
    done = run(train_cmd(a, b, run_url, "train.max_steps=6", "train.image_every=3", ranks=2))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank=0 INFO" in done.stderr and "rank=1 INFO" not in done.stderr  # one copy of each line
    for name in ("config.yaml", "export/generator.pt", "export/latest_net_G.pth", "checkpoints/latest"):
        assert storage.exists(storage.join(run_url, name)), name
    assert final_state(run_url)["step"] == 6
    steps = sorted(
        p.split("/")[-2] for p in storage.list_files(f"{run_url}/checkpoints") if p.endswith("_COMPLETE")
    )
    assert steps == ["step-000000004", "step-000000006"]  # keep_last 2
    export = generator_from_checkpoint(read_checkpoint(storage.read_bytes(f"{run_url}/export/generator.pt")))
    official = generator_from_checkpoint(
        read_checkpoint(storage.read_bytes(f"{run_url}/export/latest_net_G.pth"))
    )
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(export(x), official(x))

    tb = tmp_path / "tb"
    tb.mkdir()
    for url in storage.list_files(f"{run_url}/tb"):
        (tb / url.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(url))
    events = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("G_GAN", "D_real", "D_fake", "G", "NCE", "NCE_Y"):
        assert f"loss/{tag}" in scalars
    assert {"lr", "perf/images_per_s", "perf/data_wait", "perf/memory_mib"} <= scalars
    assert [e.step for e in events.Scalars("loss/G")] == [2, 4, 6]
    assert {"images/real_A", "images/fake_B", "images/real_B", "images/idt_B"} <= set(events.Tags()["images"])


def test_sigkill_and_restart_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, data):
    a, b = data
    settings = ["train.max_steps=16", "train.checkpoint_every=3", "data.workers=2", "train.keep_last=10"]
    reference = run(train_cmd(a, b, str(tmp_path / "ref"), *settings))
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    proc = start(train_cmd(a, b, str(run_dir), *settings), tmp_path / "killed.log")
    wait_for(lambda: (run_dir / "checkpoints" / "step-000000006" / "_COMPLETE").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    resumed = run(train_cmd(a, b, str(run_dir), *settings))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_states_equal(final_state(str(tmp_path / "ref")), final_state(str(run_dir)))


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start(
        train_cmd(a, b, str(run_dir), "train.max_steps=100000", "train.checkpoint_every=100000"), log
    )
    wait_for(lambda: "step 2/" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()
    text = log.read_text()
    assert "stop requested (SIGTERM), checkpoint saved" in text
    state = final_state(str(run_dir))
    assert state["step"] >= 2
    export = read_checkpoint((run_dir / "export" / "generator.pt").read_bytes())  # the checkpoint's G
    assert export["metadata"]["step"] == state["step"]
    assert all(torch.equal(v, state["model"]["G"][k]) for k, v in export["state_dict"].items())


def test_torchrun_restart_after_a_rank_is_killed_resumes(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    cmd = train_cmd(a, b, str(run_dir), "train.checkpoint_every=4", ranks=2, restarts=1)
    proc = start(cmd, log)
    wait_for(lambda: (run_dir / "checkpoints" / "step-000000004" / "_COMPLETE").exists(), proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    assert proc.wait(240) == 0, log.read_text()
    assert "resumed from" in log.read_text()
    assert final_state(str(run_dir))["step"] == 8  # configs/tiny.yaml: max_steps 8


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    ok = run(train_cmd(a, b, str(run_dir), "train.max_steps=4"))
    assert ok.returncode == 0
    allow = "run.allow_config_change=true"  # a resume with another lr must say so
    bad = run(train_cmd(a, b, str(run_dir), "train.max_steps=8", "train.lr=1e30", allow))
    assert bad.returncode == 1
    assert "non-finite loss" in bad.stderr and "Last good checkpoint: step 4" in bad.stderr
    assert final_state(str(run_dir))["step"] == 4


def test_bad_config_and_foreign_checkpoint_are_clear_errors(tmp_path, data):
    a, b = data
    bad = run(train_cmd(a, b, str(tmp_path / "x"), "train.lrr=1"))
    assert bad.returncode == 2 and "unknown config key 'train.lrr'" in bad.stderr
    run_dir = str(tmp_path / "run")
    assert run(train_cmd(a, b, run_dir, "train.max_steps=2")).returncode == 0
    other = run(train_cmd(a, b, run_dir, "train.max_steps=4", "model.ngf=16", "run.allow_config_change=true"))
    assert other.returncode == 2  # #27: refused naming the key before any tensor loads
    assert f"model.ngf 8 (in {run_dir}/config.yaml) -> 16" in other.stderr and "Traceback" not in other.stderr
    Path(run_dir, "config.yaml").unlink()  # a run without its config: the checkpoint itself says it
    other = run(train_cmd(a, b, run_dir, "train.max_steps=4", "model.ngf=16", "run.allow_config_change=true"))
    assert other.returncode == 1
    assert "does not match the network" in other.stderr and "Traceback" not in other.stderr


def test_periodic_evaluation_logs_scores_and_keeps_the_best_checkpoint(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cut.checkpoint import to_bytes
    from cut.domain import export_classifier, train_domain_classifier

    a, b = data
    g = torch.Generator().manual_seed(0)
    flat, noisy = torch.zeros(8, 3, 64, 64), torch.rand(8, 3, 64, 64, generator=g) * 2 - 1
    classifier = train_domain_classifier(flat, noisy, epochs=2, batch_size=8)
    (tmp_path / "domain.pt").write_bytes(to_bytes(export_classifier(classifier, test_accuracy=1.0)))
    run_dir = tmp_path / "run"
    settings = ["eval.every=4", f"eval.a={a}", f"eval.domain_classifier={tmp_path / 'domain.pt'}"]
    done = run(train_cmd(a, b, str(run_dir), *settings))
    assert done.returncode == 0, done.stderr
    assert "step 4: evaluation" in done.stderr and "step 8: evaluation" in done.stderr
    assert "picks checkpoints/best by translation_score, classifier_accuracy=1.000" in done.stderr
    best = json.loads((run_dir / "checkpoints" / "best" / "metrics.json").read_text())
    assert best["metric"] == "translation_score" and best["step"] in (4, 8)  # eval.metric auto, no FID
    assert 0 <= best["scores"]["translation_score"] <= min(best["scores"]["content_score"], 1)
    assert best["scores"]["classifier_accuracy"] == 1.0
    assert (
        read_checkpoint((run_dir / "checkpoints" / "best" / "state.pt").read_bytes())["step"] == best["step"]
    )
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/translation_score")] == [4, 8]
    bad = run(train_cmd(a, b, str(tmp_path / "x"), "eval.every=4", f"eval.a={a}"))
    assert bad.returncode == 2 and "eval.domain_classifier" in bad.stderr


def test_a_rerun_of_a_complete_run_says_so_in_one_line_and_writes_nothing(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    assert run(train_cmd(a, b, str(run_dir), "train.max_steps=4")).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    again = run(train_cmd(a, b, str(run_dir), "train.max_steps=4"))
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines() == [again.stderr.splitlines()[0]]
    assert again.stderr.split(" INFO jobs.train: ", 1)[1].strip() == (
        f"{run_dir} is already trained: step 4 of 4, its generator in {run_dir}/export/generator.pt; nothing "
        "to do. To train longer, rerun with a larger train.max_steps (now 4)")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
