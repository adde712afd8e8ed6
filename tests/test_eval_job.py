"""Evaluation end to end: image sources (listings, shard sets, inference outputs), `python -m jobs.eval`
reports with and without the Inception weights, and `evaluate_generator` for the training loop."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import image_bytes
from PIL import Image
from torch import nn

from cut import ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.domain import DomainClassifier, export_classifier
from cut.inception import WEIGHTS_NAME, FIDInception
from cut.metrics import FeatureStats, evaluate_generator, reference_statistics
from jobs.eval import main
from pipeline.images import Confinement, OutsideError, image_batches, iter_encoded
from pipeline.ingest import build_shards
from pipeline.manifest import write_part
from pipeline.shards import ShardIndex

CROP = 32


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A weights file in the real file's layout, from a randomly initialised network."""
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.manual_seed(0)
    path.write_bytes(to_bytes(FIDInception().state_dict()))
    return str(path)


@pytest.fixture
def generator_file(tmp_path: Path) -> str:
    torch.manual_seed(1)
    path = tmp_path / "generator.pt"
    path.write_bytes(to_bytes(export_generator(ResnetGenerator(ngf=8, n_blocks=2), preset="CUT")))
    return str(path)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty torch hub cache and no downloads: the Inception weights are unavailable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def png(seed: int) -> bytes:
    return image_bytes(seed, (CROP, CROP), fmt="PNG")


def translation_output(tmp_path: Path, make_images) -> Path:
    """An inference output as jobs.infer writes it: three ok rows (two image files, one member of an
    output shard; inputs from a listing and from a shard set) and one error row."""
    listing = make_images("corpus", 2, start_seed=50)
    shard_set = tmp_path / "corpus-shards"
    build_shards([str(make_images("corpus2", 1, start_seed=60))], str(shard_set), progress=False)
    index = ShardIndex.load(str(shard_set))
    shard_input = f"{index.url(index.shards[0])}#part0/img-000.jpg"
    out = tmp_path / "translated"
    rows = []
    for i, source in enumerate(sorted(listing.rglob("*.jpg"))):
        target = out / "images" / "0" / f"k{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png(70 + i))
        rows.append({"key": f"k{i}", "source_url": str(source), "output_url": str(target), "status": "ok",
                     "output_sha256": hashlib.sha256(png(70 + i)).hexdigest()})
    tar_path = out / "shards" / "part-000001.tar"
    tar_path.parent.mkdir(parents=True)
    with tarfile.open(tar_path, "w") as tar:
        data = png(80)
        info = tarfile.TarInfo("k2.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    rows.append({"key": "k2", "source_url": shard_input, "output_url": f"{tar_path}#k2.png", "status": "ok",
                 "output_sha256": hashlib.sha256(data).hexdigest()})
    write_part(str(out), 0, rows[:2])
    write_part(str(out), 1, [rows[2], {"key": "bad", "source_url": "/gone.jpg", "status": "error",
                                        "error": "corrupt", "error_detail": "not an image"}])
    return out


def corpus_roots(tmp_path: Path) -> list[str]:
    """`--inputs` for `translation_output`: where its inputs lie (a listing and a shard set)."""
    return ["--inputs", str(tmp_path / "corpus"), str(tmp_path / "corpus-shards")]


def test_images_stream_from_listings_shard_sets_and_inference_outputs(tmp_path, make_images, caplog):
    folder = make_images("a", 3)
    (folder / "part0" / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="pipeline.images"):
        batches = list(image_batches(str(folder), CROP, batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, CROP, CROP), (1, 3, CROP, CROP)]
    assert "broken.jpg" in caplog.text  # an undecodable image is skipped and named

    shard_set = str(tmp_path / "shards")
    build_shards([str(make_images("b", 3, start_seed=10))], shard_set, max_count=2, progress=False)
    assert [e.key for e in iter_encoded(shard_set)] == [  # keys of shard samples carry their shard's name
        "shard-000000.tar/part0/img-000", "shard-000000.tar/part0/img-002", "shard-000001.tar/part1/img-001"]

    out = translation_output(tmp_path, make_images)
    translated = list(iter_encoded(str(out)))
    assert [e.key for e in translated] == ["k0", "k1", "k2"]  # the error row is left out
    assert translated[2].data == png(80) and translated[2].url.endswith(".tar#k2.png")


def html_images(report: Path) -> set[str]:
    return set(re.findall(r'<img src="([^"]+)"', report.read_text()))


def test_checkpoint_evaluation_writes_metrics_report_and_table(tmp_path, make_images, generator_file,
                                                               inception_weights, capsys):
    test_a, test_b = make_images("testA", 2), make_images("testB", 2, start_seed=20)
    train_a, train_b = make_images("trainA", 4, start_seed=30), make_images("trainB", 4, start_seed=40)
    out, classifier, reference = tmp_path / "report", tmp_path / "domain.pt", tmp_path / "ref.npz"
    rc = main([
        "--checkpoint", generator_file, "--test-a", str(test_a), "--test-b", str(test_b), "--out", str(out),
        "--metrics", "fid", "kid", "domain", "--inception-weights", inception_weights,
        "--train-a", str(train_a), "--train-b", str(train_b), "--domain-classifier", str(classifier),
        "--classifier-epochs", "1", "--reference-stats", str(reference), "--crop-size", str(CROP),
        "--samples", "2", "--kid-subsets", "3", "--no-baseline",
    ])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unavailable"] == {} and metrics["baseline"] is None
    scores = metrics["translated"]  # each number once: the headline ones at the top level (#27)
    assert scores == {"count": 2, "kid_std": scores["kid_std"]}
    assert metrics["fid"] >= 0 and "kid" in metrics and 0 <= metrics["domain_score"] <= 1
    assert 0 <= metrics["real_b_domain_score"] <= 1 and metrics["real_b"] == {"count": 2}
    assert {"test_accuracy_a", "test_accuracy_b"} <= set(metrics["domain_classifier"])
    assert 0 <= metrics["classifier_accuracy"] <= 1 and "test_accuracy" not in metrics["domain_classifier"]
    assert FeatureStats.from_bytes(reference.read_bytes()).count == 2 and classifier.exists()

    report = out / "report.html"
    pngs = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert pngs == {"grid.png", "samples/000-input.png", "samples/000-output.png", "samples/001-input.png",
                    "samples/001-output.png", "real_b/000.png", "real_b/001.png"}  # real B to compare (#27)
    assert html_images(report) == pngs  # the page names every image, and every image it names exists
    assert Image.open(out / "grid.png").size == (2 * CROP, 2 * CROP)
    table = capsys.readouterr().out
    assert re.search(r"^FID +[0-9.e+-]+ +-$", table, re.M) and "domain score" in table


def test_translated_output_without_inception_weights_reports_fid_unavailable(tmp_path, make_images, offline,
                                                                           capfd):
    out = translation_output(tmp_path, make_images)
    classifier = tmp_path / "domain.pt"
    classifier.write_bytes(to_bytes(export_classifier(DomainClassifier(width=4), test_accuracy=0.9)))
    args = ["--translated", str(out), *corpus_roots(tmp_path),
            "--test-b", str(make_images("testB", 2, start_seed=20)),
            "--domain-classifier", str(classifier), "--no-download", "--crop-size", str(CROP)]
    assert main([*args, "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics["unavailable"]) == {"fid", "kid"}
    reason = metrics["unavailable"]["fid"]
    assert WEIGHTS_NAME in reason and "--inception-weights" in reason and "downloading is off" in reason
    assert metrics["translated"]["count"] == 3 and "domain_score" in metrics
    assert metrics["baseline"]["count"] == 3  # the manifest's inputs, read from a listing and a shard
    report = tmp_path / "report"
    assert html_images(report / "report.html") == {str(p.relative_to(report)) for p in report.rglob("*.png")}
    page = (report / "report.html").read_text()
    assert "domain classifier: held-out accuracy 0.900" in page and "below 0.8" not in page

    assert main([*args, "--out", str(tmp_path / "domain-only"), "--metrics", "domain"]) == 0
    only = json.loads((tmp_path / "domain-only" / "metrics.json").read_text())
    assert only["unavailable"] == {}
    assert set(only["translated"]) == {"count"}  # the scores are at the top level, once (#27)
    assert {"domain_score", "content_score", "translation_score"} <= set(only)

    capfd.readouterr()
    assert main([*args, "--out", str(tmp_path / "strict"), "--metrics", "fid"]) == 1
    assert re.search(f"ERROR jobs.eval: .*{re.escape(WEIGHTS_NAME)}", capfd.readouterr().err)
    assert not (tmp_path / "strict").exists()


def test_checkpoint_evaluation_needs_test_a(generator_file, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", generator_file, "--test-b", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2


class PixelFeatures(nn.Module):
    """A stand-in feature extractor (the Inception network is slow on CPU): pooled pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def test_evaluate_generator_scores_held_out_batches_for_training():
    torch.manual_seed(2)
    netG = ResnetGenerator(ngf=8, n_blocks=2).train()
    held_out = [torch.rand(2, 3, CROP, CROP) * 2 - 1 for _ in range(3)]
    real_b = [torch.rand(4, 3, CROP, CROP) * 2 - 1 for _ in range(2)]
    reference = reference_statistics(PixelFeatures(), real_b)
    assert reference.count == 8
    scores = evaluate_generator(netG, held_out, DomainClassifier(width=4).eval(), PixelFeatures(), reference)
    every = {"count", "domain_score", "content_score", "translation_score", "fid", "kid", "kid_std"}
    assert set(scores) == every and scores["count"] == 6
    assert netG.training  # the training loop's mode is restored
    without_inception = evaluate_generator(netG, held_out, DomainClassifier(width=4).eval())
    assert set(without_inception) == every - {"fid", "kid", "kid_std"}


def test_a_weak_classifier_warns_in_the_log_the_table_and_the_report(tmp_path, make_images, offline, capfd):
    out = translation_output(tmp_path, make_images)
    weak = tmp_path / "weak.pt"
    weak.write_bytes(to_bytes(export_classifier(DomainClassifier(width=4), test_accuracy=0.56,
                                                test_accuracy_a=0.9, test_accuracy_b=0.22)))
    rc = main(["--translated", str(out), *corpus_roots(tmp_path),
               "--test-b", str(make_images("testB", 2, start_seed=20)),
               "--domain-classifier", str(weak), "--no-download", "--crop-size", str(CROP),
               "--out", str(tmp_path / "report")])
    assert rc == 0
    captured = capfd.readouterr()
    assert re.search(r"WARNING jobs.eval: the domain classifier's held-out accuracy is 0.560, below 0.8",
                     captured.err)
    assert "WARNING: the domain classifier's held-out accuracy is 0.560" in captured.out
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["classifier_accuracy"] == 0.56 and "below 0.8" in metrics["warnings"][0]
    assert "class=\"warning\"" in (tmp_path / "report" / "report.html").read_text()


def test_per_image_scores_and_headline_numbers_are_written(tmp_path, make_images, offline):
    import duckdb
    import pyarrow.parquet as pq

    out = translation_output(tmp_path, make_images)
    classifier = tmp_path / "domain.pt"
    classifier.write_bytes(to_bytes(export_classifier(DomainClassifier(width=4), test_accuracy=0.95)))
    report = tmp_path / "report"
    assert main(["--translated", str(out), *corpus_roots(tmp_path),
                 "--test-b", str(make_images("testB", 2, start_seed=20)),
                 "--domain-classifier", str(classifier), "--no-download", "--crop-size", str(CROP),
                 "--out", str(report)]) == 0
    table = pq.read_table(report / "per_image.parquet")
    assert table.column("key").to_pylist() == ["k0", "k1", "k2"]
    assert {"content_score", "domain_probability", "translation_score",
            "identity_domain_probability"} <= set(table.column_names)
    rows = duckdb.sql(f"select min(translation_score <= content_score and translation_score <= "
                      f"domain_probability) as ok, avg(translation_score) as mean "
                      f"from '{report / 'per_image.parquet'}'").fetchall()[0]
    metrics = json.loads((report / "metrics.json").read_text())
    assert rows[0] is True and rows[1] == pytest.approx(metrics["translation_score"])
    assert metrics["identity_content_score"] == pytest.approx(1.0)
    assert metrics["identity_translation_score"] == pytest.approx(
        sum(table.column("identity_domain_probability").to_pylist()) / 3, abs=1e-6)
    assert {"translation_score", "content_score", "domain_score", "real_b_domain_score",
            "classifier_accuracy"} <= set(metrics)


def test_a_classifier_is_trained_on_its_own_and_measured_on_images_it_never_saw(tmp_path, make_images,
                                                                                capsys):
    from jobs.quality import load_domain_classifier

    train_a, train_b = make_images("trainA", 10, start_seed=30), make_images("trainB", 10, start_seed=40)
    saved = tmp_path / "classifiers" / "domain.pt"
    rc = main(["--train-classifier-only", "--domain-classifier", str(saved), "--train-a", str(train_a),
               "--train-b", str(train_b), "--classifier-epochs", "1", "--crop-size", str(CROP)])
    assert rc == 0 and "held-out accuracy" in capsys.readouterr().out
    _, meta = load_domain_classifier(str(saved))
    assert meta["train_images_a"] == 9 and meta["train_images_b"] == 9  # a tenth kept aside
    assert meta["test_images_a"] == 1 and "kept out of training" in meta["held_out"]
    assert 0 <= meta["test_accuracy"] <= 1 and not (tmp_path / "report").exists()
    with pytest.raises(SystemExit):  # where to save it is required
        main(["--train-classifier-only", "--train-a", str(train_a), "--train-b", str(train_b)])


class RecordingHandler(BaseHTTPRequestHandler):
    """Serves a PNG for any GET and records the path asked for."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        body = png(99)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on 127.0.0.1 in a thread; `.requests` lists every path it was asked for."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def infer_translated_set(tmp_path: Path, inputs: Path, generator: str) -> Path:
    """A translated set written by jobs.infer itself (files of PNGs and a Parquet manifest)."""
    from jobs.infer import main as infer

    out = tmp_path / "translated"
    assert infer(["--checkpoint", generator, "--input", str(inputs), "--out", str(out),
                  "--crop-size", str(CROP), "--workers", "0", "--no-progress"]) == 0
    return out


def tamper(out: Path, changes: dict[str, dict[str, str]]) -> None:
    """Rewrite the manifest parts of `out` with `changes[key]` applied to that key's row."""
    for part in sorted((out / "manifest").glob("part-*.parquet")):
        table = pq.read_table(part)
        rows = [{**row, **changes.get(row["key"], {})} for row in table.to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)


def private_image(tmp_path: Path) -> Path:
    """An image outside every root eval is given: pure magenta, so a leak into the report shows."""
    path = tmp_path / "private" / "secret.png"
    path.parent.mkdir()
    Image.new("RGB", (CROP, CROP), (255, 0, 255)).save(path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_translated_rows_naming_urls_outside_their_set_are_rejected_named_and_never_read(
        tmp_path, make_images, generator_file, offline, http_server, capfd):
    test_a = make_images("testA", 9, start_seed=5)
    out = infer_translated_set(tmp_path, test_a, generator_file)
    rows = pq.read_table(out / "manifest").to_pylist()
    assert all(row["status"] == "ok" for row in rows) and len(rows) == 9
    keys = sorted(row["key"] for row in rows)
    output = {row["key"]: Path(row["output_url"]) for row in rows}
    secret = private_image(tmp_path)
    link = output[keys[4]].parent / "link.png"
    link.symlink_to(secret)  # inside the translated set, pointing out of it
    port = http_server.server_address[1]
    changes = {
        keys[0]: {"output_url": f"http://127.0.0.1:{port}/x.png",
                  "output_sha256": hashlib.sha256(png(99)).hexdigest()},
        keys[1]: {"output_url": str(secret), "output_sha256": sha(secret)},
        keys[2]: {"output_url": f"{out}/images/../../private/secret.png", "output_sha256": sha(secret)},
        keys[3]: {"output_sha256": "0" * 64},
        keys[4]: {"output_url": str(link), "output_sha256": sha(secret)},
        keys[5]: {"source_url": f"http://127.0.0.1:{port}/src.png"},
        keys[6]: {"source_url": f"file://{secret}"},
    }
    tamper(out, changes)
    classifier = tmp_path / "domain.pt"
    classifier.write_bytes(to_bytes(export_classifier(DomainClassifier(width=4), test_accuracy=0.9)))
    report = tmp_path / "report"
    capfd.readouterr()
    assert main(["--translated", str(out), "--inputs", str(test_a), "--test-b", str(make_images("testB", 2)),
                 "--domain-classifier", str(classifier), "--no-download", "--crop-size", str(CROP),
                 "--samples", "9", "--out", str(report)]) == 0
    logged = capfd.readouterr().err

    assert http_server.requests == []  # nothing was fetched from the manifest's HTTP URLs
    metrics = json.loads((report / "metrics.json").read_text())
    reasons = {key: r["reason"] for key, r in metrics["rejections"].items()}
    assert reasons == {keys[0]: "output-outside", keys[1]: "output-outside", keys[2]: "output-outside",
                       keys[3]: "sha256-mismatch", keys[4]: "output-outside", keys[5]: "source-outside",
                       keys[6]: "source-outside"}
    assert metrics["rejected"] == 7 and metrics["translated"]["count"] == 2
    assert all(f"rejected {key}" in logged for key in reasons)  # each row is named in the log
    assert pq.read_table(report / "per_image.parquet").column("key").to_pylist() == keys[7:]
    shown = [np.asarray(Image.open(p).convert("RGB")) for p in (report / "samples").glob("*.png")]
    assert len(shown) == 4 and not any((img == (255, 0, 255)).all(axis=-1).mean() > 0.5 for img in shown)
    assert "7 manifest rows rejected" in (report / "report.html").read_text()

    # The same screening holds where a translated set is a plain image source (--test-b, training's eval).
    assert [e.key for e in iter_encoded(str(out))] == keys[5:]
    assert http_server.requests == []


def test_a_translated_set_none_of_whose_rows_can_be_scored_exits_2_and_writes_no_report(
        tmp_path, make_images, generator_file, offline, capfd):
    test_a = make_images("testA", 2, start_seed=5)
    out = infer_translated_set(tmp_path, test_a, generator_file)
    keys = [row["key"] for row in pq.read_table(out / "manifest").to_pylist()]
    tamper(out, {key: {"output_sha256": "f" * 64} for key in keys})
    classifier = tmp_path / "domain.pt"
    classifier.write_bytes(to_bytes(export_classifier(DomainClassifier(width=4), test_accuracy=0.9)))
    capfd.readouterr()
    assert main(["--translated", str(out), "--inputs", str(test_a), "--test-b", str(make_images("testB", 2)),
                 "--metrics", "domain", "--domain-classifier", str(classifier), "--crop-size", str(CROP),
                 "--out", str(tmp_path / "report")]) == 2
    err = capfd.readouterr().err
    assert re.search(r"ERROR jobs.eval: .*none of the 2 successful manifest rows can be scored "
                     r"\(2 sha256-mismatch", err)
    assert not (tmp_path / "report").exists()


def test_translated_needs_to_be_told_where_its_inputs_may_be_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--translated", str(tmp_path), "--test-b", str(tmp_path), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "--inputs must be given with --translated" in capsys.readouterr().err


def test_a_confinement_admits_only_urls_that_stay_under_its_roots(tmp_path):
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "images" / "out").symlink_to(tmp_path / "elsewhere")
    local = Confinement([str(root)])
    assert local.resolve(f"{root}/images/a.png") == f"{root.resolve()}/images/a.png"
    assert local.resolve(f"file://{root}/images/a.png") == f"{root.resolve()}/images/a.png"
    assert local.resolve(f"{root}/shards/p.tar#k/a.png") == f"{root.resolve()}/shards/p.tar#k/a.png"
    for url in (f"{root}/../elsewhere/a.png", f"{root}/images/out/a.png", f"{root}x/a.png", "relative/a.png",
                f"file://localhost{root}/a.png", f"http://127.0.0.1:9/{root}/a.png", f"s3:/{root}/a.png", "",
                None):
        with pytest.raises(OutsideError):
            local.resolve(url)
    shards = Confinement([f"{root}/_index.json", f"{tmp_path}/glob/*/x"])  # a shard set's, a glob's folder
    assert shards.resolve(f"{root}/p.tar#a.png") and shards.resolve(f"{tmp_path}/glob/y/a.png")

    remote = Confinement(["s3://bucket/set/", "http://127.0.0.1:8000/set"])
    assert remote.resolve("s3://bucket/set/images/a.png") == "s3://bucket/set/images/a.png"
    assert remote.resolve("http://127.0.0.1:8000/set/a.png") == "http://127.0.0.1:8000/set/a.png"
    for url in ("s3://bucket/setx/a.png", "s3://other/set/a.png", "s3://bucket/set/../x.png",
                "s3://bucket/set/%2e%2e/x.png", "s3://bucket/set/%2E%2e/x.png", "gs://bucket/set/a.png",
                "http://127.0.0.1:8001/set/a.png", "http://127.0.0.1:8000/set/%2e%2e/x", "https://127.0.0.1:8000/set/a"):
        with pytest.raises(OutsideError):
            remote.resolve(url)


# ------------------------------------------------------------------ what a new user trips over (#27)
def info_lines(err: str, text: str) -> list[str]:
    return [line for line in err.splitlines() if " INFO jobs.eval: " in line and text in line]


def test_a_classifier_is_announced_once_when_trained_and_when_reused_and_never_scores_its_own_images(
        tmp_path, make_images, offline, capfd):
    out = translation_output(tmp_path, make_images)
    train_a, train_b = make_images("trainA", 6, start_seed=30), make_images("trainB", 6, start_seed=40)
    shards_b = tmp_path / "shards-B"  # the README trains on a shard set made from the B folder
    build_shards([str(train_b)], str(shards_b), progress=False)
    classifier = tmp_path / "domain.pt"
    args = ["--translated", str(out), *corpus_roots(tmp_path), "--domain-classifier", str(classifier),
            "--train-a", str(train_a), "--train-b", str(shards_b), "--classifier-epochs", "3",
            "--metrics", "domain", "--crop-size", str(CROP)]
    test_b = str(make_images("testB", 2, start_seed=20))
    capfd.readouterr()
    assert main([*args, "--test-b", test_b, "--out", str(tmp_path / "first")]) == 0
    err = capfd.readouterr().err
    (trained,) = info_lines(err, f"domain classifier {classifier} trained and saved: held-out accuracy ")
    assert "10% of the training images" in trained
    assert len(info_lines(err, "3 epochs in")) == 1 and "epoch 1: loss" not in err  # the epochs at DEBUG

    assert main([*args, "--test-b", test_b, "--out", str(tmp_path / "second")]) == 0
    err = capfd.readouterr().err
    assert len(info_lines(err, f"domain classifier {classifier} reused: held-out accuracy ")) == 1
    assert "training on" not in err

    # --test-b holding the images the classifier trained on (as a folder, not the shard set it read)
    assert main([*args, "--test-b", str(train_b), "--out", str(tmp_path / "refused")]) == 2
    err = capfd.readouterr().err
    assert re.search(rf"ERROR jobs.eval: --test-b {re.escape(str(train_b))}: [56] of the 6 images are images "
                     rf"the domain classifier {re.escape(str(classifier))} was trained on", err)
    assert not (tmp_path / "refused").exists()
    # ... and before a classifier is trained on them: nothing trained, nothing written
    fresh = tmp_path / "fresh.pt"
    fresh_args = [a if a != str(classifier) else str(fresh) for a in args]
    assert main([*fresh_args, "--test-b", str(train_b), "--out", str(tmp_path / "refused")]) == 2
    err = capfd.readouterr().err
    assert "the domain classifier would be trained on" in err and "training on" not in err
    assert not fresh.exists() and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("flag", ["--translated", "--test-b", "--inputs"])
def test_an_input_that_does_not_exist_is_named_before_any_download_or_training(
        tmp_path, make_images, offline, capfd, flag):
    out = translation_output(tmp_path, make_images)
    values = {"--translated": str(out), "--test-b": str(make_images("testB", 2, start_seed=20)),
              "--inputs": str(tmp_path / "corpus")}
    missing = str(tmp_path / "nowhere")
    values[flag] = missing
    capfd.readouterr()
    rc = main([*(w for f, v in values.items() for w in (f, v)), "--out", str(tmp_path / "report"),
               "--train-a", str(make_images("trainA", 2)), "--train-b", str(make_images("trainB", 2, 9)),
               "--domain-classifier", str(tmp_path / "domain.pt"), "--crop-size", str(CROP)])
    err = capfd.readouterr().err
    assert rc == 2 and f"ERROR jobs.eval: {flag} {missing} does not exist" in err
    assert len(err.strip().splitlines()) == 1  # no download, no classifier warning, no manifest complaint
    assert not (tmp_path / "report").exists() and not (tmp_path / "domain.pt").exists()
    assert not (tmp_path / "torch-home").exists()


def test_fid_unavailable_is_said_once_in_the_log_and_once_in_the_report(tmp_path, make_images, offline,
                                                                       capfd):
    out = translation_output(tmp_path, make_images)
    classifier = tmp_path / "domain.pt"
    classifier.write_bytes(to_bytes(export_classifier(DomainClassifier(width=4), test_accuracy=0.9)))
    capfd.readouterr()
    assert main(["--translated", str(out), *corpus_roots(tmp_path), "--test-b", str(make_images("testB", 2)),
                 "--domain-classifier", str(classifier), "--no-download", "--crop-size", str(CROP),
                 "--out", str(tmp_path / "report")]) == 0
    captured = capfd.readouterr()
    paragraph = "FID and KID need the Inception weights file"
    assert captured.err.count(paragraph) == 1 and paragraph not in captured.out
    assert "FID and KID unavailable (why: the warning above, and report.html)" in captured.out
    assert (tmp_path / "report" / "report.html").read_text().count(paragraph) == 1


def test_the_help_examples_keep_their_line_continuations():
    from jobs.eval import build_parser

    text = build_parser().format_help()
    assert "--domain-classifier s3://b/h2z/domain.pt \\\n        --train-a s3://b/h2z/trainA" in text
    examples = text[:text.index("The translated images")]
    assert "  --train-a" not in examples.replace("\n        --train-a", "")  # no continuation collapsed


def test_a_saturated_domain_score_is_said_in_the_report_beside_a_row_of_real_b(tmp_path, make_images,
                                                                               offline, capsys):
    out = translation_output(tmp_path, make_images)
    fooled = DomainClassifier(width=4)
    nn.init.constant_(fooled.head.bias, 20.0)  # P(B) = 1 for every image
    classifier = tmp_path / "domain.pt"
    classifier.write_bytes(to_bytes(export_classifier(fooled, test_accuracy=0.9)))
    report = tmp_path / "report"
    assert main(["--translated", str(out), *corpus_roots(tmp_path), "--test-b", str(make_images("testB", 3)),
                 "--domain-classifier", str(classifier), "--metrics", "domain", "--crop-size", str(CROP),
                 "--out", str(report)]) == 0
    assert "domain score saturated" in capsys.readouterr().out
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["domain_saturated"] is True and metrics["domain_score"] == 1.0
    page = (report / "report.html").read_text()
    assert "domain score saturated" in page and "ranks the outputs by the layout they keep alone" in page
    assert "<th>P(B)</th>" not in page and "<th>content</th>" in page  # no column of 1.000
    assert {f"real_b/{i:03d}.png" for i in range(3)} <= html_images(report / "report.html")
    assert "<h2>Real B</h2>" in page
