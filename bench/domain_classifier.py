"""Domain classifier on real data: train on trainA/trainB, report accuracy on testA/testB.

`python -m bench.domain_classifier [--root ../shared/datasets/horse2zebra] [--epochs 20] [--save PATH]`

Runs the training `python -m jobs.eval --train-a ... --train-b ...` runs (same preprocessing, same
code), and prints the balanced test accuracy (the mean of the per-domain accuracies; a constant
guess scores 0.5) with the time taken. `--save` keeps the classifier for `jobs.eval --domain-classifier`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from cut.checkpoint import to_bytes
from cut.domain import export_classifier
from jobs.eval import EvalConfig, train_classifier
from pipeline import storage


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.domain_classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/datasets/horse2zebra",
                        help="folder with trainA, trainB, testA, testB")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-images", type=int, default=5000, help="training images per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the trained classifier here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(args.root)
    config = EvalConfig(train_a=str(root / "trainA"), train_b=str(root / "trainB"),
                        test_a=str(root / "testA"), test_b=str(root / "testB"), classifier_epochs=args.epochs,
                        classifier_max_images=args.max_images, seed=args.seed)
    start = time.perf_counter()
    net, meta = train_classifier(config, torch.device("cpu"))
    seconds = time.perf_counter() - start
    if args.save:
        storage.write_bytes_atomic(args.save, to_bytes(export_classifier(net, **meta)))
    print(f"domain classifier on {root.name}: {meta['train_images_a']} + {meta['train_images_b']} training "
          f"images, {args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"  test accuracy {meta['test_accuracy']:.3f} (balanced; A {meta['test_accuracy_a']:.3f} on "
          f"{meta['test_images_a']} images, B {meta['test_accuracy_b']:.3f} on {meta['test_images_b']})"
          f"  vs 0.500 for a constant guess")
    print(f"  {seconds:.1f} s in all ({meta['train_seconds']:.1f} s decode + training)")


if __name__ == "__main__":
    main()
