"""Benchmark of the CRM inference variants: same weights, same images, a fresh process each.

``python scripts/benchmark.py [--ckpt last.pt] [--variants bbox strided4] [--sizes 2048x1536]``

Every variant is an inference config ``configs/inference/<name>.yaml``; ``faithful`` always runs
first and is the reference of every ratio, delta and agreement. Each (variant, image group) runs in
its own worker process (:mod:`samsr.engine.benchmark_worker`), so CPU peak RSS is per variant and an
out-of-memory kill costs one row, not the run. The parent prepares the data
(:mod:`samsr.engine.benchmark_data`), runs the workers one after the other, scores their masks
(:mod:`samsr.engine.benchmark_report`) and writes ``benchmark.json`` and ``benchmark.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from samsr.engine.benchmark_data import Group, data_groups, synthetic_groups
from samsr.errors import SamsrError, report_error

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
REFERENCE = "faithful"
ORDER = (
    *("faithful", "patched", "factorized", "channels_last", "bf16", "bbox", "contour"),
    *("strided2", "strided4", "strided8", "tiled", "fast"),
)
EXCLUDED = ("single_scale",)
DEFAULT_SIZES = ("2048x1536", "4000x3000", "6000x4000")
QUICKSTART_CKPTS = "outputs/quickstart/*/checkpoints/last.pt"
WARMUP_SIZE = 256


class BenchmarkError(SamsrError, ValueError):
    """Bad benchmark input (arguments, data, checkpoint); the message says how to fix it."""


# --------------------------------------------------------------------------- configuration


def available_variants(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Variant names: ``configs/inference/*.yaml`` stems but single_scale, in benchmark order."""
    stems = {p.stem for p in (config_dir / "inference").glob("*.yaml")} - set(EXCLUDED)
    ordered = [v for v in ORDER if v in stems]
    return ordered + sorted(stems - set(ordered))


def select_variants(
    requested: list[str] | None, available: list[str], with_reference: bool = True
) -> list[str]:
    """The variants to run: ``requested`` (default: all) with faithful first, no duplicates.

    ``with_reference=False`` runs only ``requested`` (no ratios or agreement then), for what
    faithful cannot run on (e.g. the memory growth of tiled inference at 6000x4000 on a CPU).
    """
    if not with_reference:
        if not requested:
            raise BenchmarkError("--no-reference needs --variants")
        unknown = [v for v in requested if v not in available]
        if unknown:
            raise BenchmarkError(f"unknown variant(s) {unknown}; valid: {' '.join(available)}")
        return list(dict.fromkeys(requested))
    if REFERENCE not in available:
        raise BenchmarkError(f"configs/inference/{REFERENCE}.yaml is missing: it is the reference")
    unknown = [v for v in requested or [] if v not in available]
    if unknown:
        raise BenchmarkError(f"unknown variant(s) {unknown}; valid: {' '.join(available)}")
    return [REFERENCE, *[v for v in dict.fromkeys(requested or available) if v != REFERENCE]]


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


def check_device(name: str) -> str:
    """Validates ``--device`` without creating a CUDA context in this (unmeasured) parent."""
    import torch

    from samsr.device import resolve_device

    text = name.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
        if device.type != "cuda":
            return str(resolve_device(device))
    except (RuntimeError, ValueError) as err:
        raise BenchmarkError(f"--device {name}: {err}") from err
    if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        raise BenchmarkError(f"--device {name}: no such CUDA device on this machine")
    return text


def compose_eval(overrides: list[str]) -> Any:
    """The ``eval`` config of the repo's ``configs/``, composed with Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def _container(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def compose_variants(variants: list[str], overrides: list[str]) -> tuple[dict, dict]:
    """Resolved inference config of every variant, and the variants whose config is broken."""
    configs, errors = {}, {}
    for variant in variants:
        try:
            cfg = compose_eval([f"inference={variant}", *overrides])
            configs[variant] = _container(cfg.inference)
        except Exception as err:  # noqa: BLE001 - a broken variant config costs its row only
            message = " ".join(f"config error: {err}".split())
            if variant == REFERENCE:
                raise BenchmarkError(f"inference={variant} {overrides}: {message}") from err
            errors[variant] = message
    return configs, errors


def default_checkpoint() -> Path:
    """The newest quickstart checkpoint (by mtime) under the current folder."""
    found = sorted(Path().glob(QUICKSTART_CKPTS), key=lambda p: p.stat().st_mtime)
    if not found:
        raise BenchmarkError(
            f"no --ckpt given and no {QUICKSTART_CKPTS} found: run `python scripts/train.py "
            "experiment=quickstart` first, pass --ckpt PATH (a samsr checkpoint or the official "
            "CRM model_45705), or use --random-weights (smoke test; accuracy is then meaningless)"
        )
    return found[-1]


def resolve_model(args: argparse.Namespace) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """The model config (plain dict), the weights file (None: random) and a checkpoint summary."""
    from samsr.engine.checkpoint import CKPT_FORMAT, load_checkpoint

    backbone = [f"model.net.backbone={args.backbone}"] if args.backbone else []
    if args.random_weights:
        model = _container(compose_eval(backbone or ["model.net.backbone=resnet18"]).model)
        return model, None, {"kind": "random", "path": None}
    path = Path(args.ckpt) if args.ckpt else default_checkpoint()
    ckpt = load_checkpoint(path)
    info: dict[str, Any] = {"kind": "official", "path": str(path)}
    if isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT:
        model = (ckpt.get("config") or {}).get("model")
        if not isinstance(model, dict) or not isinstance(model.get("net"), dict):
            raise BenchmarkError(f"{path} is a samsr checkpoint without config.model.net")
        saved = model["net"].get("backbone")
        if args.backbone and args.backbone != saved:
            raise BenchmarkError(
                f"{path} holds a {saved} model; --backbone only applies to official CRM files "
                "and --random-weights"
            )
        info.update(kind="samsr", model_name=ckpt.get("model_name"), step=ckpt.get("step"))
    else:
        model = _container(compose_eval(backbone).model)
    del ckpt
    return model, str(path), info


def build_groups(args: argparse.Namespace) -> list[Group]:
    """The image groups: one per ``--data`` folder, else one per synthetic ``--sizes`` entry."""
    if args.data:
        return data_groups(args.data, args.coarse_dir, args.num_images)
    n = args.num_images or 1
    return synthetic_groups(args.cache_dir, args.sizes, n, args.seed, args.coarse_factor)


# --------------------------------------------------------------------------- running


def _progress(done: int, total: int, variant: str, group: str, row: dict[str, Any]) -> None:
    text = row["status"]
    if text == "ok":
        agree = row.get("agreement_pct")
        text = (
            f"{row['time_s']:.3f} s/img, peak {row['peak_mem_gib']:.3f} GiB, IoU "
            f"{row['iou_pct']:.2f}, mBA {row['mba_pct']:.2f}, agreement "
            + ("n/a" if agree is None else f"{agree:.3f} %")
        )
    print(f"[{done}/{total}] {variant} @ {group}: {text}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from samsr.data.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def _job(variant: str, group: Group, out: Path, shared: dict[str, Any]) -> dict[str, Any]:
    items = [
        {"name": it.name, "image": str(it.image), "coarse": str(it.coarse)} for it in group.items
    ]
    return {
        **{k: v for k, v in shared.items() if k != "configs"},
        "variant": variant,
        "group": group.name,
        "inference": shared["configs"][variant],
        "mask_dir": str(out / "masks" / variant / group.name),
        "result": str(out / "workers" / f"{variant}__{group.name}.json"),
        "items": items,
    }


def _run_facts(args: argparse.Namespace, argv: list[str], device: str, out: Path) -> dict:
    import torch

    import samsr
    from samsr.device import describe
    from samsr.engine.checkpoint import git_commit

    synthetic = f"synthetic in {args.cache_dir}, coarse = GT down{args.coarse_factor:g}"
    return {
        "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
        "command": shlex.join(argv),
        "argv": argv,
        "args": vars(args),
        "out": str(out),
        "device": device,
        "device_description": describe(device) if device == "cpu" else None,  # CUDA: the workers'
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "samsr_version": samsr.__version__,
        "git_commit": git_commit(),
        "data": ", ".join(args.data) if args.data else synthetic,
        "warmup_size": WARMUP_SIZE,
        "reference": REFERENCE,
        "inference_overrides": args.inference_override,
        "profile": bool(args.profile),
    }


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Runs every (group, variant) worker; writes ``benchmark.json`` and ``benchmark.md``."""
    from samsr.data.io import atomic_write_bytes, read_mask
    from samsr.engine.benchmark_report import add_reference_columns, format_report, score_coarse
    from samsr.engine.benchmark_worker import measure_variant

    device = check_device(args.device)
    variants = select_variants(args.variants, available_variants(), not args.no_reference)
    configs, broken = compose_variants(variants, args.inference_override)
    model, weights, ckpt_info = resolve_model(args)
    groups = build_groups(args)
    out = Path(args.out or f"outputs/benchmark/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    (out / "workers").mkdir(parents=True, exist_ok=True)
    bench = _run_facts(args, argv, device, out)
    bench.update(checkpoint=ckpt_info, model=model, variants=variants, variant_configs=configs)
    bench["groups"] = {}
    shared = {"device": device, "model": model, "weights": weights, "configs": configs}
    shared.update(seed=args.seed, warmup_size=WARMUP_SIZE, progress=sys.stderr.isatty())
    shared["profile"] = bool(args.profile)
    total, done = len(groups) * len(variants), 0
    for group in groups:
        gts = {it.name: read_mask(it.gt) for it in group.items}
        coarses = {it.name: read_mask(it.coarse) for it in group.items}
        sizes = [{"name": n, "height": m.shape[0], "width": m.shape[1]} for n, m in gts.items()]
        entry: dict[str, Any] = {"source": group.source, "images": sizes, "variants": {}}
        entry["coarse"] = score_coarse(gts, coarses)
        bench["groups"][group.name] = entry
        reference = None
        for variant in variants:
            done += 1
            if variant in broken:
                row: dict[str, Any] = {"status": f"failed ({broken[variant]})"}
                row["error"] = broken[variant]
            else:
                job = _job(variant, group, out, shared)
                row, masks = measure_variant(job, args.timeout, (gts, coarses), reference)
                reference = masks if variant == REFERENCE else reference
            entry["variants"][variant] = row
            for key in ("peak_memory_kind", "device_description"):
                bench[key] = row.get(key) or bench.get(key)
            _progress(done, total, variant, group.name, row)
        add_reference_columns(entry["variants"], REFERENCE)
        _write_json(out / "benchmark.json", bench)  # after every group: a kill keeps the rest
        atomic_write_bytes(out / "benchmark.md", format_report(bench).encode())
    bench["finished"] = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
    _write_json(out / "benchmark.json", bench)
    if not args.keep_masks:
        shutil.rmtree(out / "masks", ignore_errors=True)
    return bench


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/benchmark.py`` command line."""
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description="Compare CRM inference variants (configs/inference/<name>.yaml) on the same "
        "images with the same weights: time, peak memory, IoU/mBA and agreement with faithful. "
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
