"""Job flags generated from config dataclasses (jobs.cli.option / add_options): one flag per field, and
a flag not given leaves the field's default, the one place that default is written."""

from __future__ import annotations

import dataclasses

import pytest

from jobs import eval as eval_job
from jobs import export as export_job
from jobs import infer as infer_job
from jobs.cli import given
from jobs.config import build
from jobs.eval import EvalConfig
from jobs.export import ExportConfig
from jobs.infer_config import InferConfig

REQUIRED = {
    InferConfig: (infer_job, ["--checkpoint", "g.pt", "--input", "in/", "--out", "out/"],
                  {"checkpoint": "g.pt", "inputs": ["in/"], "out": "out/"}),
    EvalConfig: (eval_job, ["--translated", "t/", "--test-b", "b/", "--out", "out/"],
                 {"translated": "t/", "test_b": "b/", "out": "out/"}),
    ExportConfig: (export_job, ["--checkpoint", "g.pt", "--out", "out/", "--format", "onnx"],
                   {"checkpoint": "g.pt", "out": "out/", "format": "onnx"}),
}


@pytest.mark.parametrize("cls", list(REQUIRED), ids=lambda c: c.__name__)
def test_every_field_is_one_flag_and_unset_flags_keep_the_dataclass_defaults(cls):
    job, argv, values = REQUIRED[cls]
    parser = job.build_parser()
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "log_format")]
    assert sorted(dests) == sorted(f.name for f in dataclasses.fields(cls))
    config = build(cls, given(parser.parse_args(argv), "log_format"), "command line")
    assert config == cls(**values)


def test_switches_follow_the_field_type():
    parser = infer_job.build_parser()
    base = ["--checkpoint", "g.pt", "--input", "a", "b", "--out", "o"]
    args = given(parser.parse_args([*base, "--no-progress", "--skip-input-check", "--no-bf16", "--compile",
                                    "--plan-timeout", "5", "--tile-size", "64"]), "log_format")
    config = build(InferConfig, args, "command line")
    assert config.inputs == ["a", "b"]
    assert (config.progress, config.check_inputs, config.bf16, config.compile) == (False, False, False, True)
    assert config.channels_last is None and config.plan_timeout == 5.0 and config.tile_size == 64


def test_list_defaults_are_not_shared():
    assert InferConfig().inputs is not InferConfig().inputs
