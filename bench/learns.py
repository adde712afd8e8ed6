"""Does training learn a real translation? CUT on horse2zebra on this CPU, scored as it trains.

    python -m bench.learns [--root ../shared/datasets/horse2zebra] [--minutes 25] [--every 1000]

Runs the commands a user would run, and nothing else:
1. `jobs.eval --train-classifier-only` on trainA/trainB (held-out accuracy on testA/testB);
2. `jobs.train` (CUT preset, a narrowed generator, 72 px loads and 64 px crops) with periodic
   evaluation on testA every `--every` steps (`eval.metric` auto: translation_score without FID
   weights); stopped with SIGTERM after `--minutes` (the run checkpoints and exits 0);
3. `jobs.eval --checkpoint` on the untrained generator (a 1-step run with the same seed: the
   curve's start), on the final export and on checkpoints/best, against the identity baseline.
It prints the curve (step, translation, content and domain scores) read back from TensorBoard,
and leaves the reports (report.html, with the gallery) under OUT/best, OUT/final and OUT/step-1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra"
MODEL = ["model.preset=CUT", "model.ngf=32", "model.ndf=32", "model.n_blocks=6", "model.netF_nc=128",
         "model.num_patches=128"]
SIZE = 64


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(root: Path, out: Path, classifier: Path, every: int, minutes: float, extra: list[str]) -> float:
    """jobs.train until SIGTERM after ``minutes``; returns the seconds it ran."""
    cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/cut.yaml", *MODEL,
           f"data.a={root / 'trainA'}", f"data.b={root / 'trainB'}", f"run.url={out / 'run'}",
           "data.load_size=72", f"data.crop_size={SIZE}", "data.workers=1", "train.lr=0.0005",
           "train.n_epochs=40", "train.n_epochs_decay=0", f"train.checkpoint_every={every}",
           "train.keep_last=2", "train.log_every=200", f"train.image_every={every}",
           f"eval.every={every}", f"eval.a={root / 'testA'}", f"eval.domain_classifier={classifier}",
           "eval.max_images=120", *extra]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"jobs.train exited {proc.returncode}")
    return time.perf_counter() - start


def evaluate(checkpoint: Path, root: Path, classifier: Path, out: Path) -> dict:
    run([sys.executable, "-m", "jobs.eval", "--checkpoint", str(checkpoint), "--test-a", str(root / "testA"),
         "--test-b", str(root / "testB"), "--domain-classifier", str(classifier), "--metrics", "domain",
         "--crop-size", str(SIZE), "--samples", "16", "--out", str(out)])
    return json.loads((out / "metrics.json").read_text())


def curve(tb: Path) -> list[tuple[int, float, float, float]]:
    events = EventAccumulator(str(tb))
    events.Reload()
    series = [{e.step: e.value for e in events.Scalars(f"eval/{name}")}
              for name in ("translation_score", "content_score", "domain_score")]
    return [(step, *(s[step] for s in series)) for step in sorted(series[0])]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.learns", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SHARED, help="folder with trainA, trainB, testA, testB")
    parser.add_argument("--out", type=Path, default=Path("bench-out/learns"), help="emptied first")
    parser.add_argument("--minutes", type=float, default=25.0, help="training time before SIGTERM")
    parser.add_argument("--every", type=int, default=1000, help="steps between evaluations")
    parser.add_argument("overrides", nargs="*", help="extra jobs.train config overrides (key=value)")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    classifier = out / "domain-classifier.pt"
    run([sys.executable, "-m", "jobs.eval", "--train-classifier-only", "--domain-classifier", str(classifier),
         "--train-a", str(args.root / "trainA"), "--train-b", str(args.root / "trainB"),
         "--test-a", str(args.root / "testA"), "--test-b", str(args.root / "testB"),
         "--crop-size", str(SIZE)])
    start_run = out / "start"
    run([sys.executable, "-m", "jobs.train", "--config", "configs/cut.yaml", *MODEL,
         f"data.a={args.root / 'trainA'}", f"data.b={args.root / 'trainB'}", f"run.url={start_run}",
         "data.load_size=72", f"data.crop_size={SIZE}", "data.workers=0", "train.max_steps=1"])
    start = evaluate(start_run / "export" / "generator.pt", args.root, classifier, out / "step-1")
    seconds = train(args.root, out, classifier, args.every, args.minutes, args.overrides)
    final = evaluate(out / "run" / "export" / "generator.pt", args.root, classifier, out / "final")
    best = evaluate(out / "run" / "checkpoints" / "best" / "state.pt", args.root, classifier, out / "best")
    rows = [(1, start["translation_score"], start["content_score"], start["domain_score"])]
    rows += curve(out / "run" / "tb")
    print(f"\nCUT (ngf 32, 6 blocks) on {args.root.name} at {SIZE} px, {seconds / 60:.1f} min of training, "
          f"{os.cpu_count()} cores; domain classifier held-out accuracy {start['classifier_accuracy']:.3f}")
    print(f"{'step':>8s} {'translation':>12s} {'content':>9s} {'domain':>8s}")
    for step, t, c, d in rows:
        print(f"{step:8d} {t:12.3f} {c:9.3f} {d:8.3f}")
    print(f"final export: translation {final['translation_score']:.3f} (identity "
          f"{final['identity_translation_score']:.3f}), content {final['content_score']:.3f}, domain "
          f"{final['domain_score']:.3f} (real B {final.get('real_b_domain_score', float('nan')):.3f})")
    best_step = json.loads((out / "run" / "checkpoints" / "best" / "metrics.json").read_text())["step"]
    print(f"checkpoints/best (step {best_step}): translation {best['translation_score']:.3f}, content "
          f"{best['content_score']:.3f}, domain {best['domain_score']:.3f}")
    print(f"galleries: {out / 'best' / 'report.html'}, {out / 'final' / 'report.html'}, "
          f"{out / 'step-1' / 'report.html'}")


if __name__ == "__main__":
    main()
