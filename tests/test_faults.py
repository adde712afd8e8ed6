"""Shard sets and training runs that survive bad state: lying indexes, killed rebuilds, stale spools,
Ctrl-C, an unreadable newest checkpoint, configs that cannot train, and signals at any moment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import image_bytes
from test_train import assert_states_equal, final_state, run, shard_set, train_cmd, train_here

from jobs.signals import StopSignals
from pipeline.shards import SPOOL_DIR, ShardIndex, iter_shard

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path: Path) -> tuple[str, str]:
    a = shard_set(tmp_path, str(tmp_path / "A"), "A", 10, 0)
    return a, shard_set(tmp_path, str(tmp_path / "B"), "B", 7, 1)


def lying_set(tmp_path: Path, name: str, index_text: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "a.tar").write_bytes(b"\0" * 2048)
    (folder / "_index.json").write_text(index_text)
    return str(folder)


# ----------------------------------------------------------------------------------- shard indexes
@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"shards": [{"name": "a.tar", "samples": -3, "bytes": 2048}]}, "non-negative"),
        ("{not json", "is not valid JSON"),
        ({"shards": [{"name": "../outside.tar", "samples": 1, "bytes": 2048}]}, "'..'"),
        ({"version": 7, "shards": []}, "index version 7"),
    ],
)
def test_a_lying_or_broken_index_stops_training_at_once_naming_the_file(tmp_path, data, body, message):
    a, _ = data
    bad = lying_set(tmp_path, "bad", body if isinstance(body, str) else json.dumps(body))
    start = time.monotonic()
    done = run(train_cmd(a, bad, str(tmp_path / "run")), timeout=120)
    assert done.returncode == 1 and time.monotonic() - start < 60
    assert message in done.stderr and f"{bad}/_index.json" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_set_with_no_decodable_sample_is_named(tmp_path, data):
    a, _ = data
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(4):
        (folder / f"bad-{i}.jpg").write_bytes(image_bytes(i)[:40])  # truncated JPEGs: shards refuse them
    from pipeline.shards import ShardWriter

    writer = ShardWriter(str(tmp_path / "junkset"), "j-", max_count=10, max_size=1 << 20)
    for i in range(4):
        writer.write(f"k{i}", {"jpg": b"not an image"})
    ShardIndex(str(tmp_path / "junkset"), tuple(writer.close())).save()
    done = run(train_cmd(a, str(tmp_path / "junkset"), str(tmp_path / "run")), timeout=120)
    assert done.returncode == 1
    assert f"no decodable sample in shard set {tmp_path / 'junkset'}" in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------- jobs.shard
def shard_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.shard",
        str(src),
        "--out",
        str(out),
        "--max-count",
        "2",
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]


def many_images(folder: Path, n: int, size: int = 256) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"img-{i:04d}.png").write_bytes(image_bytes(i, (size, size), fmt="PNG"))
    return folder


def slow_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1")


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_a_rebuild_killed_midway_leaves_the_old_set_readable_and_a_rerun_cleans_up(tmp_path):
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "set"
    old = many_images(tmp_path / "old", 3, size=32)
    assert subprocess.run(shard_cmd(old, out), env=slow_env(tmp_path), cwd=ROOT).returncode == 0
    new = many_images(tmp_path / "new", 60)
    proc = subprocess.Popen(shard_cmd(new, out, "--overwrite"), env=slow_env(tmp_path), cwd=ROOT)
    wait_until(lambda: (out / "shard-r2-000001.tar").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    index = ShardIndex.load(str(out))  # the old set, whole
    index.check_complete()
    assert index.samples == 3 and sum(1 for s in index.shards for _ in iter_shard(index.url(s))) == 3
    spools = tmp_path / "tmp" / SPOOL_DIR
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    (spools / f"{dead}-left.tar").write_bytes(b"\0" * 1024)  # as a writer killed mid-shard leaves it

    done = subprocess.run(
        shard_cmd(new, out, "--overwrite"), env=slow_env(tmp_path), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert ShardIndex.load(str(out)).samples == 60
    assert not list(spools.iterdir())
    names = {p.name for p in out.iterdir()}
    assert names == {"_index.json", "_rejects.jsonl"} | {s.name for s in ShardIndex.load(str(out)).shards}


@pytest.mark.slow
def test_a_killed_first_build_is_called_incomplete_and_ctrl_c_exits_130_in_one_line(tmp_path):
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "set"
    src = many_images(tmp_path / "src", 60)
    proc = subprocess.Popen(shard_cmd(src, out), env=slow_env(tmp_path), cwd=ROOT)
    wait_until(lambda: (out / "shard-000001.tar").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    rerun = subprocess.run(
        shard_cmd(src, out), env=slow_env(tmp_path), cwd=ROOT, capture_output=True, text=True
    )
    assert rerun.returncode == 2 and "no _index.json: a build that was interrupted" in rerun.stderr
    assert "--overwrite" in rerun.stderr and "already holds a shard set" not in rerun.stderr

    proc = subprocess.Popen(
        shard_cmd(src, tmp_path / "other"),
        env=slow_env(tmp_path),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: (tmp_path / "other" / "shard-000001.tar").exists(), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err and "No such file" not in err and "SIGINT" in err
    assert not list((tmp_path / "tmp" / SPOOL_DIR).glob(f"{proc.pid}-*"))
    assert not (tmp_path / "other" / "_index.json").exists()


def test_permanent_storage_errors_are_not_retried(tmp_path):
    import errno

    from pipeline import storage

    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    calls = []

    def read() -> bytes:
        calls.append(1)
        return loop.read_bytes()

    with pytest.raises(OSError) as caught:
        storage.retry(read, what="read a symlink loop")
    assert caught.value.errno == errno.ELOOP and len(calls) == 1


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_an_unreadable_newest_checkpoint_is_set_aside_and_training_ends_as_if_uninterrupted(tmp_path, data):
    a, b = data
    settings = ["train.max_steps=12", "train.checkpoint_every=4", "train.keep_last=5"]
    reference = run(train_cmd(a, b, str(tmp_path / "ref"), *settings))
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "run"
    assert run(train_cmd(a, b, str(run_dir), "train.max_steps=8", *settings[1:])).returncode == 0
    state = run_dir / "checkpoints" / "step-000000008" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a store that lost the end of the newest checkpoint
    resumed = run(train_cmd(a, b, str(run_dir), *settings))
    assert resumed.returncode == 0, resumed.stderr
    assert "cannot be read" in resumed.stderr and "moved it aside" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000000004" in resumed.stderr
    assert list((run_dir / "checkpoints").glob("step-000000008.unreadable-*/state.pt"))
    assert_states_equal(final_state(str(tmp_path / "ref")), final_state(str(run_dir)))


@pytest.mark.slow
def test_with_every_checkpoint_unreadable_the_run_stops_unless_told_to_start_fresh(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    assert run(train_cmd(a, b, str(run_dir), "train.max_steps=4")).returncode == 0
    (run_dir / "checkpoints" / "step-000000004" / "state.pt").write_bytes(b"")
    stopped = run(train_cmd(a, b, str(run_dir), "train.max_steps=6"))
    assert stopped.returncode == 1 and "start_fresh_if_unreadable" in stopped.stderr
    fresh = run(train_cmd(a, b, str(run_dir), "train.max_steps=2", "train.start_fresh_if_unreadable=true"))
    assert fresh.returncode == 0 and final_state(str(run_dir))["step"] == 2


@pytest.mark.slow
def test_a_second_sigterm_ends_a_run_at_once(tmp_path, data):
    a, b = data
    log = tmp_path / "run.log"
    cmd = train_cmd(
        a,
        b,
        str(tmp_path / "run"),
        "train.max_steps=100000",
        "train.checkpoint_every=100000",
        "model.ngf=32",
        "data.crop_size=128",
        "data.load_size=144",
    )  # steps of about a second
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: "step 2/" in log.read_text(), proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "finishing what is under way" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)  # before the step ends and its checkpoint is written
    assert proc.wait(30) == 143, log.read_text()[-2000:]
    text = log.read_text()
    assert "stopping now" in text and "checkpoint saved" not in text


def test_signals_stop_at_once_outside_graceful_work_and_second_signals_always():
    stops = StopSignals()
    with stops.installed():
        with pytest.raises(SystemExit) as first:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert first.value.code == 143
        stops.graceful = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stops.is_set() and stops.exit_code == 130
        with pytest.raises(SystemExit) as second:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert second.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is not stops.handle



def test_a_forked_worker_ignores_the_stop_signal_its_job_handles_and_says_nothing(caplog):
    """Ctrl-C reaches the DataLoader workers too (they inherit the handler): the announcement and
    the decision belong to the job's own process, once."""
    stops = StopSignals()
    with stops.installed():
        stops.graceful = True
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the worker: survives SIGINT and SIGTERM, requests nothing
            os.close(read)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            os.write(write, b"set" if stops.is_set() else b"clear")
            os._exit(0)
        os.close(write)
        answer = os.read(read, 16)
        _, status = os.waitpid(child, 0)
        os.close(read)
        assert answer == b"clear" and os.waitstatus_to_exitcode(status) == 0
        assert not stops.is_set() and "SIGINT" not in caplog.text

@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.beta1=5", "train.beta1"),
        ("train.beta2=1", "train.beta2"),
        ("model.nce_layers=[99]", "model.nce_layers"),
        ("model.nce_layers=[-1,4]", "model.nce_layers"),
        ("train.n_epochs=0", "train.n_epochs"),
    ],
)
def test_configs_that_cannot_train_are_refused_naming_the_key(tmp_path, data, override, key):
    a, b = data
    extra = [override, "train.n_epochs_decay=0"] if override == "train.n_epochs=0" else [override]
    done = train_here(a, b, str(tmp_path / "run"), *extra)
    assert done.returncode == 2 and key in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_yaml_file_whose_top_level_is_not_a_mapping_is_refused(tmp_path):
    from jobs.config import ConfigError, TrainConfig, load_config

    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, str(tmp_path / "list.yaml"), ["train.lr=0.1"])


@pytest.mark.slow
def test_an_export_whose_write_failed_is_a_clear_error_and_the_rerun_rewrites_it_from_the_newest_checkpoint(
    tmp_path, data
):
    import torch

    from cut import read_checkpoint

    a, b = data
    run_dir = tmp_path / "run"
    assert run(train_cmd(a, b, str(run_dir), "train.max_steps=4")).returncode == 0
    step_8 = run_dir / "checkpoints" / "step-000000008"
    step_8.write_bytes(b"")  # a file where the checkpoint's folder must go: its writes fail
    no_checkpoint = run(train_cmd(a, b, str(run_dir), "train.max_steps=8"))
    assert no_checkpoint.returncode == 1 and "Traceback" not in no_checkpoint.stderr, no_checkpoint.stderr
    assert f"step 8: could not write the checkpoint under {run_dir / 'checkpoints'}" in no_checkpoint.stderr
    assert final_state(str(run_dir))["step"] == 4
    step_8.unlink()

    blocker = run_dir / "export" / "generator.pt"  # a folder where the export's file must go: writes fail
    blocker.unlink()
    (blocker / "x").mkdir(parents=True)
    failed = run(train_cmd(a, b, str(run_dir), "train.max_steps=8"))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "step 8: checkpoint committed, but writing its export" in failed.stderr
    assert f"{blocker}" in failed.stderr and final_state(str(run_dir))["step"] == 8
    (blocker / "x").rmdir()
    blocker.rmdir()  # space freed

    rerun = run(train_cmd(a, b, str(run_dir), "train.max_steps=8"))
    assert rerun.returncode == 0, rerun.stderr
    assert "export/ holds step 4, not the newest checkpoint: rewriting it" in rerun.stderr
    newest = final_state(str(run_dir))["model"]["G"]
    export = read_checkpoint(blocker.read_bytes())
    official = read_checkpoint((run_dir / "export" / "latest_net_G.pth").read_bytes())
    assert export["metadata"]["step"] == 8
    assert json.loads((run_dir / "export" / "model_card.json").read_text())["step"] == 8
    for weights in (export["state_dict"], official):
        assert all(torch.equal(v, newest[k]) for k, v in weights.items())
