"""One trainer per run: the run's lease (pipeline.lease) on local and S3 storage, second trainers
refused naming the owner, dead or frozen owners taken over, and changed configs refused or kept."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import yaml
from test_train import final_state, run, shard_set, start, train_cmd, train_here, wait_for

from pipeline import storage
from pipeline.lease import Lease, LeaseHeldError, LeaseLostError, Owner


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path: Path) -> str:
    return request.getfixturevalue("s3_url") if request.param == "s3" else str(tmp_path / "run")


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_held_lease_refuses_a_second_owner_and_a_stale_one_is_taken_over(folder):
    url = storage.join(folder, "lease.json")
    first = Lease(url, stale_after=60, heartbeat=3600)  # holds, then stops beating (a frozen owner)
    first.acquire()
    with pytest.raises(LeaseHeldError, match=rf"pid {first.me.pid}.*owner since .*{url}"):
        Lease(url, stale_after=60).acquire()
    time.sleep(0.3)
    successor = Lease(url, stale_after=0.2)  # first's last heartbeat is older than this window
    successor.acquire()
    assert successor.taken_from is not None and successor.taken_from.token == first.me.token
    assert Owner.parse(storage.read_bytes(url)).token == successor.me.token
    with pytest.raises(LeaseLostError, match="taken over"):
        first.check()  # the frozen owner, awake again, must not write
    first.release()  # leaves the successor's lease alone
    assert Owner.parse(storage.read_bytes(url)).token == successor.me.token
    successor.release()
    assert not storage.exists(url)
    with Lease(url, stale_after=60):  # free again at once
        assert storage.exists(url)
    assert not storage.exists(url)


def test_the_same_job_takes_its_lease_over_at_once_and_the_old_holder_notices(folder):
    url = storage.join(folder, "lease.json")
    old = Lease(url, job="torchrun abc", stale_after=60, heartbeat=0.05)
    old.acquire()
    other_job = Lease(url, job="torchrun xyz", stale_after=60)
    with pytest.raises(LeaseHeldError, match="job torchrun abc"):
        other_job.acquire()
    restarted = Lease(url, job="torchrun abc", stale_after=60)
    restarted.acquire()
    wait_until(lambda: old.lost is not None, "the old holder's heartbeat to see the take-over")
    assert "now held by" in old.lost
    old.release()
    restarted.release()
    assert not storage.exists(url)


# ---------------------------------------------------------------------------------------- jobs.train
@pytest.fixture
def data(tmp_path: Path) -> tuple[str, str]:
    return (
        shard_set(tmp_path, str(tmp_path / "A"), "A", 10, 0),
        shard_set(tmp_path, str(tmp_path / "B"), "B", 7, 1),
    )


def lease_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "lease.json").read_text())


@pytest.mark.slow
def test_a_second_trainer_exits_2_naming_the_owner_until_the_owner_dies(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    common = "run.lease_stale_after=5", "train.n_epochs=10000"  # every run: a long schedule, a short window
    owner_log = tmp_path / "owner.log"
    owner = start(train_cmd(a, b, str(run_dir), "train.max_steps=100000", "train.checkpoint_every=100000",
                            *common), owner_log)
    wait_for(lambda: "step 2/" in owner_log.read_text(), owner)

    second = run(train_cmd(a, b, str(run_dir), "train.max_steps=100000", *common))
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in second.stderr
    assert f"pid {owner.pid}" in errors[0] and "owner since" in errors[0]
    assert str(run_dir / "lease.json") in errors[0] and "last heartbeat" in errors[0]
    torchrun = run(train_cmd(a, b, str(run_dir), *common, ranks=2))  # a torchrun job: refused, no hang
    assert torchrun.returncode != 0 and f"pid {owner.pid}" in torchrun.stderr

    owner.send_signal(signal.SIGSTOP)  # alive but frozen: its heartbeat stops
    try:
        frozen_at = lease_of(run_dir)["time"]
        time.sleep(5.5)  # the window passes without a heartbeat
        assert lease_of(run_dir)["time"] == frozen_at
        successor = run(train_cmd(a, b, str(run_dir), "train.max_steps=4", *common))
        assert successor.returncode == 0, successor.stderr
        assert "took over the lease" in successor.stderr and "no heartbeat for" in successor.stderr
    finally:
        owner.send_signal(signal.SIGCONT)
    assert owner.wait(120) == 2  # it wakes, finds the run taken over, and stops without writing
    assert "taken over by another trainer" in owner_log.read_text()
    assert final_state(str(run_dir))["step"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000000004"]

    killed_log = tmp_path / "killed.log"
    endless = ["train.max_steps=100000", "train.checkpoint_every=2", *common]
    killed = start(train_cmd(a, b, str(run_dir), *endless), killed_log)
    wait_for(lambda: (run_dir / "checkpoints" / "step-000000006" / "_COMPLETE").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    after_kill = run(train_cmd(a, b, str(run_dir), "train.max_steps=8", *common))  # at once: no waiting
    assert after_kill.returncode == 0, after_kill.stderr
    assert f"its process {killed.pid} on this host is gone" in after_kill.stderr
    assert "resumed from" in after_kill.stderr and final_state(str(run_dir))["step"] == 8
    assert not (run_dir / "lease.json").exists()  # released on a clean exit


@pytest.mark.slow
def test_a_changed_config_is_refused_listing_the_keys_unless_allowed_and_every_config_is_kept(tmp_path, data):
    a, b = data
    run_dir = tmp_path / "run"
    assert run(train_cmd(a, b, str(run_dir), "train.max_steps=2")).returncode == 0
    changed = ["train.max_steps=4", "train.lr=0.001", "model.lambda_NCE=2"]
    refused = train_here(a, b, str(run_dir), *changed)  # in-process: a refusal before training
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "train.lr 0.0002 -> 0.001" in refused.stderr and "model.lambda_NCE" in refused.stderr
    assert "train.max_steps" not in refused.stderr.split("changed:")[1]  # free to change on resume
    assert "run.allow_config_change=true" in refused.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.0002
    assert final_state(str(run_dir))["step"] == 2

    allowed = run(train_cmd(a, b, str(run_dir), *changed, "run.allow_config_change=true"))
    assert allowed.returncode == 0, allowed.stderr
    assert final_state(str(run_dir))["step"] == 4
    extended = run(train_cmd(a, b, str(run_dir), *changed[1:], "train.max_steps=6", "train.log_every=1"))
    assert extended.returncode == 0, extended.stderr  # only keys free on resume changed
    history = sorted(p.name for p in (run_dir / "config-history").iterdir())
    assert history == ["0001-step-000000000.yaml", "0002-step-000000002.yaml", "0003-step-000000004.yaml"]
    used = [yaml.safe_load((run_dir / "config-history" / n).read_text()) for n in history]
    assert [(c["train"]["lr"], c["model"]["lambda_NCE"], c["train"]["max_steps"]) for c in used] == [
        (0.0002, None, 2), (0.001, 2.0, 4), (0.001, 2.0, 6)]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == used[-1]
    assert final_state(str(run_dir))["config"]["train"]["lr"] == 0.001
