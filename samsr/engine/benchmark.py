"""Benchmark of the CRM inference variants: same weights, same images, a fresh process each.

``python scripts/benchmark.py [--ckpt last.pt] [--variants bbox strided4] [--sizes 2048x1536]``

Every variant is an inference config (``samsr/configs/inference/<name>.yaml``); ``faithful`` runs
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
from samsr.engine.configs import CONFIG_DIR
from samsr.errors import SamsrError

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "faithful"
ORDER = (
    *("faithful", "patched", "factorized", "channels_last", "bf16", "bbox", "contour"),
    *("strided2", "strided4", "strided8", "tiled", "fold_bn", "bf16_encoder", "band"),
    *("tiled_auto", "fast", "fast_fp32", "fast_batched", "fast_untiled", "fast_compiled"),
)
EXCLUDED = ("single_scale",)
DEFAULT_SIZES = ("2048x1536", "4000x3000", "6000x4000")
QUICKSTART_CKPTS = "outputs/quickstart/*/checkpoints/last.pt"
WARMUP_SIZE = 256


class BenchmarkError(SamsrError, ValueError):
    """Bad benchmark input (arguments, data, checkpoint); the message says how to fix it."""


# --------------------------------------------------------------------------- configuration


def available_variants(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Variant names: ``samsr/configs/inference/*.yaml`` stems but single_scale, in benchmark
    order."""
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
        raise BenchmarkError(
            f"samsr/configs/inference/{REFERENCE}.yaml is missing: it is the reference"
        )
    unknown = [v for v in requested or [] if v not in available]
    if unknown:
        raise BenchmarkError(f"unknown variant(s) {unknown}; valid: {' '.join(available)}")
    return [REFERENCE, *[v for v in dict.fromkeys(requested or available) if v != REFERENCE]]


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
    """The ``eval`` config of the repo's ``samsr/configs/`` with ``overrides``."""
    from samsr.engine.configs import compose

    return compose("eval", overrides)


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
    """The model config (plain dict), the weights file (None: random) and a checkpoint summary.

    A checkpoint's model is built from its own stored config (:mod:`samsr.engine.loading`);
    ``--backbone`` picks the ResNet of an official CRM file or of ``--random-weights``."""
    from samsr.engine.checkpoint import LoadedCheckpoint
    from samsr.engine.loading import checkpoint_model_config

    backbone = [f"model.net.backbone={args.backbone}"] if args.backbone else []
    if args.random_weights:
        model = _container(compose_eval(backbone or ["model.net.backbone=resnet18"]).model)
        return model, None, {"kind": "random", "path": None}
    path = Path(args.ckpt) if args.ckpt else default_checkpoint()
    loaded = LoadedCheckpoint.read(path)
    info: dict[str, Any] = {"kind": "official", "path": str(path)}
    if loaded.is_samsr:
        model = _container(checkpoint_model_config(loaded))
        saved = model["net"].get("backbone")
        if args.backbone and args.backbone != saved:
            raise BenchmarkError(
                f"{path} holds a {saved} model; --backbone only applies to official CRM files "
                "and --random-weights"
            )
        ckpt = loaded.content
        info.update(kind="samsr", model_name=ckpt.get("model_name"), step=ckpt.get("step"))
    else:
        model = _container(compose_eval(backbone).model)
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
    from samsr.data.io import atomic_write_bytes, read_coarse_mask, read_mask
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
        coarses = {it.name: read_coarse_mask(it.coarse) for it in group.items}
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
