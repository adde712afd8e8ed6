"""Pack images into WebDataset shards plus a shard index, checking every image on the way in.

A SOURCE may be a table of encoded images, as jobs.infer reads them: a Parquet dataset (a file, a
folder or prefix of part files, hive k=v folders, a glob; a Hugging Face `datasets` export included)
or a Delta table. Its image column is binary or the `datasets` Image struct (--image-column); keys
come from --key-column, else the struct's path, else the row's part file and position.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from jobs.cli import HelpFormatter, add_logging_arguments, run_job
from jobs.logs import setup_logging
from jobs.signals import StopSignals
from pipeline.ingest import KeyCollisionError, ListingError, OutputOverlapError, build_shards
from pipeline.pixels import DEFAULT_MAX_PIXELS
from pipeline.shards import ShardIndexError
from pipeline.tables import TableError, TableOptions

EPILOG = """\
outputs:
  OUT/PREFIX-000000.tar ...  shards; a sample is <key>.<ext> (original bytes) + <key>.json (metadata);
                             a rebuild (--overwrite) names its shards PREFIX-r<N>-000000.tar ...
  OUT/_rejects.jsonl         one {"source_url", "reason", "detail"} per image kept out; a table row's
                             also has "file" (its part file) and "row" (its position there)
  OUT/_index.json            every shard with its sample count and bytes, and totals (written last)

SIGTERM or Ctrl-C stops a build at once (exit 143 or 130); the output keeps the set it had.
Every path is an fsspec URL; S3 endpoint and credentials come from AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (any S3-compatible store).

examples:
  python -m jobs.shard data/horse2zebra/trainA --out s3://bucket/h2z/trainA --prefix trainA --domain A
  python -m jobs.shard s3://lake/horses/data/ --out s3://bucket/h2z/trainA --domain A   # a datasets export
  python -m jobs.shard s3://lake/delta/horses --table-version 12 --key-column id --out s3://bucket/h2z/A
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.shard",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder or prefix (image files, recursive), a glob, a single file, a .txt "
        "(one URL a line) or .parquet (column 'url') list of URLs, or a table: a Parquet dataset (file, "
        "folder of part files, glob) with an image column, or a Delta table",
    )
    parser.add_argument("--image-column", metavar="NAME",
                        help="a table SOURCE's image column: binary, or the datasets Image struct "
                        "(default: the one column of either type)")
    parser.add_argument("--key-column", metavar="NAME",
                        help="a table SOURCE's key column, strings or integers (default: the Image "
                        "struct's path, else the row's part file and position)")
    parser.add_argument("--table-version", type=int, metavar="N",
                        help="the version of a Delta table SOURCE to read (default: its current snapshot)")
    parser.add_argument("--out", required=True, metavar="URL", help="folder URL for the shard set")
    parser.add_argument(
        "--prefix", default="shard", metavar="NAME", help="shard name prefix (default: shard)"
    )
    parser.add_argument("--domain", metavar="NAME", help="domain recorded in each sample's metadata (e.g. A)")
    parser.add_argument(
        "--max-count",
        type=int,
        default=10_000,
        metavar="N",
        help="samples per shard at most (default: 10000)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=256 << 20,
        metavar="BYTES",
        help="bytes per shard at most (default: 256 MiB; a larger image gets a shard alone)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"reject images over N pixels, decompression bombs included (default: {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--workers", type=int, default=8, metavar="N", help="images read and checked in parallel (default: 8)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shard set in --out, or finish an interrupted build: the new shards are written "
        "beside the old ones, readers switch when the new index is written, then the old files go",
    )
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bar (drawn only when stderr is a terminal)")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--max-count", args.max_count), ("--max-size", args.max_size),
                        ("--max-pixels", args.max_pixels), ("--workers", args.workers)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, not {value}")  # exit 2 before anything is read or written
    if args.table_version is not None and args.table_version < 0:
        parser.error(f"--table-version must be >= 0, not {args.table_version}")
    setup_logging(0, args.log_format)
    # SIGTERM/SIGINT end the build at once (exit 143/130): the spool is removed on the way out and the
    # output keeps the set it had (a rebuild switches sets only by writing its index, last).
    with StopSignals().installed():
        return _build(args)


def _build(args: argparse.Namespace) -> int:
    try:
        summary = build_shards(
            args.sources,
            args.out,
            prefix=args.prefix,
            domain=args.domain,
            max_count=args.max_count,
            max_size=args.max_size,
            max_pixels=args.max_pixels,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            tables=TableOptions(args.image_column, args.key_column, (), args.table_version),
        )
    except (FileNotFoundError, FileExistsError, KeyCollisionError, ListingError, OutputOverlapError,
            ShardIndexError, TableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # storage trouble after retries
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(summary)))
    return 0


if __name__ == "__main__":
    run_job(main)
