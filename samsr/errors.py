"""samsr's own errors, and how the scripts report them.

Every error samsr raises about its input (:class:`~samsr.data.io.DataError`,
:class:`~samsr.engine.builders.ConfigError`, :class:`~samsr.engine.checkpoint.CheckpointError`,
:class:`~samsr.engine.benchmark.BenchmarkError`) derives from :class:`SamsrError` as well as from
its usual built-in base (``ValueError`` or ``RuntimeError``), and its message names the file or
setting and the fix. The scripts in ``scripts/`` run through :func:`exit_on_error`: such an error
ends them with ``error: <message>`` on stderr and exit status 2 instead of a traceback;
``SAMSR_TRACEBACK=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) shows the traceback instead.

This module imports neither torch nor hydra.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "DataError",
    "EXIT_STATUS",
    "TRACEBACK_ENV",
    "SamsrError",
    "exit_on_error",
    "find_samsr_error",
    "report_error",
    "traceback_wanted",
]

EXIT_STATUS = 2
"""Exit status of a script ended by bad input (argparse's status for bad arguments too)."""

TRACEBACK_ENV = ("SAMSR_TRACEBACK", "HYDRA_FULL_ERROR")
"""Environment variables that, set to anything but ``""``/``0``, ask for the full traceback."""

F = TypeVar("F", bound=Callable[..., Any])


class SamsrError(Exception):
    """Base of samsr's errors about its input: bad data, config, checkpoint or arguments.

    The message says what is wrong and how to fix it; scripts print it as ``error: <message>``
    and exit with status 2 (see :func:`exit_on_error`).
    """


class ConfigError(SamsrError, ValueError):
    """A configuration value, preset or override is missing or invalid."""


class DataError(SamsrError, ValueError):
    """Bad or missing input data; the message names the file(s) and how to fix it.

    Defined here (not in :mod:`samsr.data`) so that every package, guidance included, raises the
    same error; ``samsr.data.io.DataError`` is this class.
    """


def traceback_wanted() -> bool:
    """Whether ``SAMSR_TRACEBACK`` or ``HYDRA_FULL_ERROR`` asks for full tracebacks."""
    return any(os.environ.get(name, "") not in ("", "0") for name in TRACEBACK_ENV)


def _is_wrapper(err: BaseException) -> bool:
    """Hydra's ``instantiate`` re-raises what a ``_target_`` raised as InstantiationException."""
    hydra_errors = sys.modules.get("hydra.errors")
    wrapper = getattr(hydra_errors, "InstantiationException", None)
    return wrapper is not None and isinstance(err, wrapper)


def find_samsr_error(err: BaseException) -> SamsrError | None:
    """``err`` if it is a :class:`SamsrError`, or the one a Hydra ``instantiate`` wrapped."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, SamsrError):
            return current
        if not _is_wrapper(current):
            return None
        seen.add(id(current))
        current = current.__cause__
    return None


def _message(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker, the original message."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback (most recent call last):" in text:
        # torch's ExceptionWrapper: "Caught X in DataLoader worker process N.\nOriginal <tb>"
        cls = type(err)
        for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            head, found, tail = text.rpartition(f"\n{name}")
            if found:
                where = head.splitlines()[0].removeprefix(f"Caught {cls.__name__} ").rstrip(".")
                return f"{tail.strip()} ({where})"
    return text


def report_error(err: BaseException, prog: str | None = None) -> int:
    """Prints ``[prog: ]error: <message>`` to stderr and returns :data:`EXIT_STATUS`.

    Call it in an ``except`` block: when :func:`traceback_wanted`, it re-raises ``err`` instead.
    """
    if traceback_wanted():
        raise err
    prefix = f"{prog}: " if prog else ""
    sys.stdout.flush()
    print(f"{prefix}error: {_message(err)}", file=sys.stderr, flush=True)
    return EXIT_STATUS


def exit_on_error(func: F) -> F:
    """Decorates an entry point: a :class:`SamsrError` ends it with one message and exit 2.

    The error (also one wrapped by Hydra's ``instantiate``) is printed as ``error: <message>`` on
    stderr, without a traceback, and the process exits with status 2 (``SystemExit``, which Hydra
    lets through). Other exceptions propagate unchanged. With ``SAMSR_TRACEBACK=1`` or
    ``HYDRA_FULL_ERROR=1`` the error propagates too (full traceback). Put it *under*
    ``@hydra.main``, so that it runs inside Hydra's job::

        @hydra.main(version_base="1.3", config_path="../samsr/configs", config_name="eval")
        @exit_on_error
        def main(cfg: DictConfig) -> None: ...

    or wrap an argparse ``main``: ``sys.exit(exit_on_error(main)())``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            found = find_samsr_error(err)
            if found is None or traceback_wanted():
                raise
            raise SystemExit(report_error(found)) from None

    return wrapper  # type: ignore[return-value]
