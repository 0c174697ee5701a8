"""samsr's errors at the entry points: one ``error:`` line on stderr and exit status 2.

The scripts run as real subprocesses (Hydra's own error handling is part of what is tested) on the
tiny synthetic set; each run is a few seconds, mostly imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from samsr.data.io import DataError
from samsr.engine.benchmark import BenchmarkError
from samsr.engine.builders import ConfigError
from samsr.engine.checkpoint import CheckpointError
from samsr.errors import EXIT_STATUS, SamsrError, exit_on_error

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ["device=cpu", "model.net.backbone=resnet18"]
TINY_SYNTHETIC = [  # the synthetic set of 1 training and 1 test image: generated in ~1 s
    "data.prepare.num_train=1",
    "data.prepare.train_long_side=64",
    "data.prepare.num_val=1",
    "data.prepare.num_test=1",
    "data.prepare.test_long_side=[96,128]",
]


def _script(name: str, *args: str, env: dict[str, str] | None = None):
    environ = {
        k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SAMSR_TRACEBACK")
    }
    environ.update(env or {}, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environ, timeout=300)


def _hydra(name: str, tmp_path: Path, *overrides: str, env: dict[str, str] | None = None):
    paths = [f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", *TINY_EVAL]
    synthetic = [] if any(o.startswith("data=") for o in overrides) else TINY_SYNTHETIC
    return _script(name, *paths, *synthetic, *overrides, env=env)


def _one_error_line(result, *parts: str) -> str:
    """The run ended with exit 2 and exactly one stderr line, ``error: ...`` holding ``parts``."""
    assert result.returncode == EXIT_STATUS, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error: " in lines[0]
    for part in parts:
        assert part in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "notes.txt"
    path.write_text("these are my notes, not weights\n")
    return path


def test_error_classes_share_a_base_and_keep_theirs():
    for cls, builtin in (
        (DataError, ValueError),
        (ConfigError, ValueError),
        (BenchmarkError, ValueError),
        (CheckpointError, RuntimeError),
    ):
        assert issubclass(cls, SamsrError) and issubclass(cls, builtin)


def test_errors_module_imports_neither_torch_nor_hydra():
    code = "import sys, samsr.errors; print('torch' in sys.modules, 'hydra' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False False"


def test_exit_on_error(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("SAMSR_TRACEBACK", raising=False)

    @exit_on_error
    def fails(err: Exception) -> None:
        raise err

    with pytest.raises(SystemExit) as info:
        fails(DataError("image x.jpg not found"))
    assert info.value.code == EXIT_STATUS
    assert capsys.readouterr().err == "error: image x.jpg not found\n"
    wrapped = InstantiationException("Error in call to target 'Dataset': ...")
    wrapped.__cause__ = ConfigError("bad crop_size")
    with pytest.raises(SystemExit):
        fails(wrapped)  # Hydra's instantiate wraps what a _target_ raises
    assert capsys.readouterr().err == "error: bad crop_size\n"
    with pytest.raises(KeyError):
        fails(KeyError("a bug, not bad input: its traceback stays"))
    for name in ("SAMSR_TRACEBACK", "HYDRA_FULL_ERROR"):
        with monkeypatch.context() as env:
            env.setenv(name, "1")
            with pytest.raises(DataError):
                fails(DataError("shown with its traceback"))
    assert capsys.readouterr().err == ""


def test_exit_on_error_unwraps_a_dataloader_worker_error(capsys, monkeypatch):
    import torch

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("SAMSR_TRACEBACK", raising=False)

    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int):
            raise DataError("cannot decode image a.jpg: truncated file.")

    @exit_on_error
    def train() -> None:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))

    with pytest.raises(SystemExit):
        train()
    assert capsys.readouterr().err == (
        "error: cannot decode image a.jpg: truncated file. (in DataLoader worker process 0)\n"
    )


def test_eval_without_ckpt_path(tmp_path):
    _one_error_line(_hydra("eval", tmp_path), "error: eval needs weights: pass ckpt_path=")


def test_eval_missing_checkpoint(tmp_path):
    missing = tmp_path / "missing.pt"
    _one_error_line(_hydra("eval", tmp_path, f"ckpt_path={missing}"), f"not found: {missing}")


def test_eval_text_file_as_checkpoint(tmp_path, text_ckpt):
    line = _one_error_line(
        _hydra("eval", tmp_path, f"ckpt_path={text_ckpt}"),
        f"{text_ckpt} is not a PyTorch checkpoint: it is a text file",
        "scripts/train.py",
    )
    assert "KeyError" not in line  # torch's unpickler message is not the story


@pytest.mark.parametrize("variable", ["HYDRA_FULL_ERROR", "SAMSR_TRACEBACK"])
def test_eval_traceback_on_request(tmp_path, text_ckpt, variable):
    result = _hydra("eval", tmp_path, f"ckpt_path={text_ckpt}", env={variable: "1"})
    assert result.returncode not in (0, EXIT_STATUS)
    assert "Traceback (most recent call last)" in result.stderr
    assert f"CheckpointError: {text_ckpt} is not a PyTorch checkpoint" in result.stderr


def test_train_bad_config_value(tmp_path):
    missing = tmp_path / "gone" / "last.pt"
    _one_error_line(
        _hydra("train", tmp_path, f"resume={missing}"), f"resume checkpoint not found: {missing}"
    )


def test_train_missing_data(tmp_path):
    result = _hydra("train", tmp_path, "data=train_merged", f"paths.data_dir={tmp_path}/none")
    _one_error_line(result, f"error: data root not found: {tmp_path}/none/")


def test_benchmark_text_file_as_checkpoint(tmp_path, text_ckpt):
    args = ["--device", "cpu", "--variants", "faithful", "--out", str(tmp_path / "out")]
    result = _script("benchmark", *args, "--ckpt", str(text_ckpt))
    _one_error_line(result, f"benchmark.py: error: {text_ckpt} is not a PyTorch checkpoint")


def test_argparse_scripts_show_the_traceback_on_request(tmp_path, monkeypatch):
    from samsr.engine.benchmark_cli import main as benchmark
    from samsr.engine.precompute import main as precompute

    monkeypatch.setenv("SAMSR_TRACEBACK", "1")
    with pytest.raises(BenchmarkError, match="unknown variant"):
        benchmark(["--device", "cpu", "--variants", "nope", "--out", str(tmp_path)])
    with pytest.raises(DataError, match="image folder not found"):
        precompute(["--images", str(tmp_path / "none"), "--out", str(tmp_path), "--tiny-sam"])
