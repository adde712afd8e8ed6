"""What an ML engineer meets in the first hour and on day three: help, logs, folders as training data,
TensorBoard, the README's first run, and a repository that cites only itself."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from string import Template

import pytest
import yaml
from conftest import image_bytes
from test_train import assert_states_equal, final_state, run, start, train_cmd, wait_for

from jobs.config import TrainConfig, schema_keys

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("shard", "train", "infer", "eval", "demo")


def folder_of_images(root: Path, n: int, seed: int, size=(40, 44)) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img-{i:03d}.png").write_bytes(image_bytes(seed + i, size, fmt="PNG"))
    return root


# ------------------------------------------------------------------------------------------- help
def test_train_help_lists_every_config_key_from_the_schema():
    from jobs.train import build_parser

    text = build_parser().format_help()
    for key, kind, _default, meaning in schema_keys(TrainConfig):
        assert re.search(rf"^  {re.escape(key)} +{re.escape(kind)} = ", text, re.M), key
        assert meaning and meaning[:40] in " ".join(text.split()), key


@pytest.mark.parametrize("job", JOBS)
def test_every_flag_of_every_job_says_what_it_does(job):
    parser = importlib.import_module(f"jobs.{job}").build_parser()
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"jobs.{job} {action.option_strings or action.dest} has no help"
    help_text = parser.format_help()
    assert "(default: " in help_text or job == "demo"



@pytest.mark.parametrize("job", (*JOBS, "export"))
def test_a_switch_never_shows_a_stored_default_that_reads_as_if_it_were_on(job):
    """``--no-progress ... (default: True)`` reads as if the bar were hidden by default."""
    parser = importlib.import_module(f"jobs.{job}").build_parser()
    for action in parser._actions:
        if action.nargs == 0 and action.option_strings and not isinstance(action, argparse._HelpAction):
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            assert "(default: True)" not in shown and "(default: False)" not in shown, action.option_strings

def test_print_config_shows_the_resolved_config_and_exits():
    from inprocess import run_main

    from jobs.train import main as train_main

    done = run_main(train_main, "--config", "configs/fastcut.yaml", "data.a=x", "data.b=y",
                    "run.url=/nonexistent/run", "--print-config")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert config["train"]["n_epochs"] == 150 and config["train"]["n_epochs_decay"] == 50  # from the preset
    assert not Path("/nonexistent/run").exists()



@pytest.mark.parametrize("job", ["shard", "infer"])
def test_a_progress_bar_is_drawn_only_on_a_terminal(tmp_path, capfd, job):
    """A redirected stderr (a log file, a pod's log) gets log lines, not a carriage-return stream."""
    from test_infer import write_generator

    images = folder_of_images(tmp_path / "in", 3, 0)
    if job == "shard":
        from jobs.shard import main

        argv = [str(images), "--out", str(tmp_path / "set")]
    else:
        from jobs.infer import main

        ckpt = write_generator(tmp_path / "g.pt")
        argv = ["--checkpoint", ckpt, "--input", str(images), "--out", str(tmp_path / "out"),
                "--crop-size", "32"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "img/s" not in err and "it/s" not in err, err[-2000:]

# ------------------------------------------------------------------------------------------- logs
@pytest.mark.slow
def test_json_log_lines_parse_for_every_job(tmp_path):
    from test_infer import write_generator

    images = folder_of_images(tmp_path / "in", 3, 0)
    ckpt = write_generator(tmp_path / "g.pt")
    commands = [
        ["jobs.shard", str(images), "--out", str(tmp_path / "set"), "--no-progress"],
        [
            "jobs.infer",
            "--checkpoint",
            ckpt,
            "--input",
            str(images),
            "--out",
            str(tmp_path / "out"),
            "--crop-size",
            "32",
            "--no-progress",
        ],
        [
            "jobs.train",
            "--config",
            "configs/tiny.yaml",
            f"data.a={tmp_path / 'set'}",
            f"data.b={tmp_path / 'set'}",
            f"run.url={tmp_path / 'run'}",
            "train.max_steps=2",
        ],
    ]
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", *command, "--log-format", "json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        assert len(records) >= 2, done.stderr
        assert {"time", "level", "logger", "rank", "message"} <= set(records[0])
        assert not re.search(r"rank=\d+ (INFO|WARNING)", done.stderr), "a text log line among the JSON ones"


# ----------------------------------------------------------------------------- folders as data
@pytest.mark.slow
def test_training_from_plain_folders_resumes_bit_exactly_after_sigkill(tmp_path):
    a = folder_of_images(tmp_path / "A", 10, 0)
    b = folder_of_images(tmp_path / "B", 7, 50)
    settings = ["train.max_steps=16", "train.checkpoint_every=3", "data.workers=2", "train.keep_last=10"]

    def command(run_dir: Path) -> list[str]:
        return train_cmd(str(a), str(b), str(run_dir), *settings)

    reference = run(command(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    assert (tmp_path / "ref" / "data" / "a.txt").read_text().splitlines() == sorted(
        str(p) for p in a.iterdir()
    )
    run_dir = tmp_path / "killed"
    proc = start(command(run_dir), tmp_path / "killed.log")
    wait_for(lambda: (run_dir / "checkpoints" / "step-000000006" / "_COMPLETE").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    (a / "new.png").write_bytes(
        image_bytes(99, (40, 44), fmt="PNG")
    )  # the folder grows; the run's list does not
    resumed = run(command(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_states_equal(final_state(str(tmp_path / "ref")), final_state(str(run_dir)))


# ------------------------------------------------------------------------------------ TensorBoard
@pytest.mark.slow
def test_tensorboard_holds_image_grids_the_config_the_model_card_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = folder_of_images(tmp_path / "A", 6, 0)
    b = folder_of_images(tmp_path / "B", 6, 50)
    done = run(train_cmd(str(a), str(b), str(tmp_path / "run"), "train.max_steps=4", "train.image_every=4"))
    assert done.returncode == 0, done.stderr
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    grid = events.Images("images/fake_B")[-1]
    assert (grid.width, grid.height) == (4 * 32, 32)  # the last four steps side by side
    tensors = set(events.Tags()["tensors"])
    assert {"config/text_summary", "model_card/text_summary"} <= tensors
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_blocks: 2" in config_text
    assert list((tmp_path / "run" / "tb").rglob("hparams/events.out.tfevents.*"))


# ------------------------------------------------------------------------------------ the README
def readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {title}") :]
    block = section[section.index("```sh\n") + 6 : section.index("\n```", section.index("```sh\n"))]
    return [line.split("  #")[0].rstrip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_first_run_on_your_own_data_runs(tmp_path):
    data = tmp_path / "data"
    folder_of_images(data / "trainA", 8, 0)
    folder_of_images(data / "trainB", 8, 40)
    folder_of_images(data / "testA", 3, 80)
    folder_of_images(data / "testB", 3, 120)  # real B the domain classifier never trained on
    lines = readme_block("First run on your own data")
    commands = [line for line in lines if line.startswith("python -m")]
    assert [c.split()[2] for c in commands] == [
        "jobs.shard",
        "jobs.shard",
        "jobs.train",
        "jobs.infer",
        "jobs.eval",
    ]
    small = {  # the same commands at a size that suits a test
        "jobs.train": " train.max_steps=4 model.ngf=8 model.ndf=8 model.n_blocks=2 model.netF_nc=16 "
        "model.num_patches=16 data.load_size=36 data.crop_size=32 data.workers=0",
        "jobs.infer": " --crop-size 32",
        "jobs.eval": " --crop-size 32 --classifier-epochs 1 --metrics domain",
    }
    env = dict(os.environ, DATA=str(data), RUN=str(tmp_path / "run"), OMP_NUM_THREADS="1")
    for command in commands:
        command += small.get(command.split()[2], "")
        words = [Template(w).substitute(DATA=env["DATA"], RUN=env["RUN"]) for w in shlex.split(command)]
        done = subprocess.run(
            [sys.executable, *words[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())


def test_the_repository_cites_no_document_it_lacks():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / f for f in tracked.splitlines() if f.endswith((".py", ".md", ".yaml", ".toml", ".txt"))]
    files += [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and p not in files]
    missing = []
    for path in files:
        if not path.exists():
            continue
        for name in re.findall(r"[\w./-]*[\w-]+\.md\b", path.read_text(errors="ignore")):
            candidates = [ROOT / name, path.parent / name, ROOT / "docs" / Path(name).name]
            if not any(c.exists() for c in candidates) and not name.startswith(("http", "www.")):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_docs_name_every_manifest_error_code_and_no_other():
    """docs/inference.md's table of `error` codes is the one pipeline/manifest.py enforces."""
    from pipeline.manifest import ERROR_CODES

    text = (ROOT / "docs" / "inference.md").read_text()
    table = text[text.index("| `error` | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", table, re.M)) - {"error"}  # the header
    assert documented == set(ERROR_CODES)


def test_the_readme_exit_code_table_covers_every_job():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| job | 0 | 1 | 2 |"):]
    table = table[:table.index("\n\n")]
    rows = set(re.findall(r"^\| `?(?:python -m )?jobs\.(\w+)`? \|", table, re.M))
    assert rows >= {"shard", "train", "infer", "eval", "export"}
