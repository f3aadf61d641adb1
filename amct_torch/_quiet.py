"""Silence third-party loggers and console streams for the duration of a call we report on ourselves."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterable, Iterator

__all__ = ["quiet"]


@contextlib.contextmanager
def quiet(loggers: Iterable[str], *, stdout: bool = False, stderr: bool = False) -> Iterator[None]:
    """Raise ``loggers`` to ERROR and optionally swallow stdout/stderr; everything is restored afterwards."""
    objs = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in objs]
    for lg in objs:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            if stdout:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for lg, lv in zip(objs, levels):
            lg.setLevel(lv)
