"""The command line of the benchmark (``scripts/benchmark.py``; ``--worker JOB`` runs one worker,
:mod:`samsr.engine.benchmark_worker`). The benchmark itself: :mod:`samsr.engine.benchmark`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from samsr.engine.benchmark import DEFAULT_SIZES, QUICKSTART_CKPTS, run_benchmark
from samsr.errors import SamsrError, report_error

__all__ = ["build_parser", "main", "parse_override", "parse_size"]


def parse_size(text: str) -> tuple[int, int]:
    """``"2048x1536"`` -> ``(2048, 1536)``, i.e. (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected WxH, e.g. 2048x1536")
    w, h = int(parts[0]), int(parts[1])
    if min(w, h) < 32:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: width and height must be >= 32")
    return w, h


def parse_override(text: str) -> str:
    """``chunk_size=1`` or ``inference.chunk_size=1`` -> ``inference.chunk_size=1`` (+/~ kept)."""
    key, sep, value = text.partition("=")
    bare = key.lstrip("+~")
    if not sep or not bare:
        raise argparse.ArgumentTypeError(f"bad override {text!r}: expected key=value")
    prefix = key[: len(key) - len(bare)]
    return f"{prefix}{bare if bare.startswith('inference.') else 'inference.' + bare}={value}"


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/benchmark.py`` command line."""
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Compare CRM inference variants (samsr/configs/inference/<name>.yaml) on the "
        "same images with the same weights: time, peak memory, IoU/mBA and agreement with "
        "faithful. "
        "Each (variant, image group) runs in a fresh process.",
        epilog="examples:\n"
        "  python scripts/benchmark.py                                   # quickstart ckpt, all\n"
        "  python scripts/benchmark.py --variants bbox strided4 --sizes 2048x1536\n"
        "  python scripts/benchmark.py --ckpt checkpoints/model_45705 --backbone resnet50 \\\n"
        "      --data /datasets/BIG/test --coarse-dir /datasets/BIG/test_coarse/pspnet\n"
        "exit status: 0 report written, 1 every worker failed, 2 bad input",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="variants to run (default: all but single_scale); faithful is always added",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="do not add faithful (no ratios/agreement): e.g. memory growth of tiled variants",
    )
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        metavar="WxH",
        default=[parse_size(s) for s in DEFAULT_SIZES],
        help=f"synthetic image sizes, one group each (default: {' '.join(DEFAULT_SIZES)})",
    )
    p.add_argument(
        "--num-images",
        type=_positive(int),
        metavar="N",
        help="images per synthetic size (default 1); with --data: the first N of "
        "each folder (default all)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="DIR",
        help="BIG-layout folders (<name>_im.jpg, <name>_gt.png, <name>_seg.png), "
        "one group each, instead of synthetic images",
    )
    p.add_argument(
        "--coarse-dir",
        nargs="+",
        metavar="DIR",
        help="folder(s) holding the <name>_seg.png coarse masks: one, or one per --data",
    )
    p.add_argument(
        "--cache-dir",
        default="data/benchmark",
        help="synthetic image cache (default: data/benchmark)",
    )
    p.add_argument(
        "--coarse-factor",
        type=_positive(float),
        default=16.0,
        help="synthetic coarse masks: the GT downsampled this many times (default: 16)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the synthetic images and random weights (default: 0)",
    )
    p.add_argument(
        "--ckpt",
        help=f"samsr checkpoint or official CRM file (default: the newest {QUICKSTART_CKPTS})",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random-init CRM (resnet18 unless --backbone): smoke tests only, the "
        "accuracy columns are meaningless",
    )
    p.add_argument(
        "--backbone",
        choices=["resnet18", "resnet34", "resnet50", "resnet101"],
        help="encoder of an official CRM file or of --random-weights",
    )
    p.add_argument(
        "--inference-override",
        nargs="+",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for every variant, e.g. inference.chunk_size=65536",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profiling run: also time every encode/decode stage (the device is synchronised "
        "around each stage and tile, which inflates the times; default: whole images only)",
    )
    p.add_argument("--out", help="output folder (default outputs/benchmark/<date>_<time>)")
    p.add_argument(
        "--timeout",
        type=_positive(float),
        metavar="S",
        help="seconds per worker before it is killed (default: none)",
    )
    p.add_argument(
        "--keep-masks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the refined masks in <out>/masks/<variant>/<group>/ (default: keep)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--worker JOB``, one worker); returns the exit status.

    Exit status: 0 when the report was written and at least one worker succeeded, 1 when every
    worker failed, 2 on bad input.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        from samsr.engine.benchmark_worker import worker_main

        return worker_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.random_weights and args.ckpt:
        parser.error("--ckpt and --random-weights exclude each other")
    if args.coarse_dir and not args.data:
        parser.error("--coarse-dir needs --data")
    try:
        bench = run_benchmark(args, ["scripts/benchmark.py", *argv])
    except SamsrError as err:  # BenchmarkError, DataError, CheckpointError, ConfigError
        return report_error(err, "benchmark.py")
    from samsr.engine.benchmark_report import format_report

    print(format_report(bench))
    print(f"results: {Path(bench['out']) / 'benchmark.md'}", file=sys.stderr)
    rows = [r for g in bench["groups"].values() for r in g["variants"].values()]
    failed = sum(r["status"] != "ok" for r in rows)
    if failed:
        print(f"benchmark.py: {failed} of {len(rows)} workers failed", file=sys.stderr)
    return 1 if rows and failed == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
