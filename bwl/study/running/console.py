"""Progress of the study: lines into the notebook, and under the runner also to its console, one per stage,
adapter and grid (the notebooks' tables and plots stay in the executed notebooks); and in JupyterLab or Colab, one
``tqdm.auto`` bar per long stage (a widget bar), at a time."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

CONSOLE_ENV = "BWL_CONSOLE"  # set by the runner for the kernels it starts (they inherit its environment)
_bars = {"on": True}  # off in a notebook run with interactive=False (papermill), where a bar would only be stored


def log(line: str) -> None:
    """Print ``line``; inside a kernel started by the runner, also write it to the runner's console."""
    print(line, flush=True)
    if os.environ.get(CONSOLE_ENV) and sys.stdout is not sys.__stdout__ and sys.__stdout__ is not None:
        sys.__stdout__.write(f"    {line}\n")
        sys.__stdout__.flush()


@contextmanager
def console_for_kernels() -> Iterator[None]:
    """Within this block, kernels started by this process echo :func:`log` lines to its console."""
    previous = os.environ.get(CONSOLE_ENV)
    os.environ[CONSOLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[CONSOLE_ENV]
        else:
            os.environ[CONSOLE_ENV] = previous


def show_progress(enabled: bool) -> None:
    """Whether :func:`progress` draws bars in this process (the notebooks' setup passes their ``interactive``)."""
    _bars["on"] = enabled


def progress(total: int, desc: str) -> tqdm:
    """A progress bar for one long stage: a widget bar in JupyterLab and Colab, a text bar in a terminal. Off under
    the runner, whose console gets :func:`log` lines instead, in non-interactive notebook runs (papermill, where the
    bar would only be stored), and for stages of at most one step."""
    disable = not _bars["on"] or bool(os.environ.get(CONSOLE_ENV)) or total <= 1
    return tqdm(total=total, desc=desc, disable=disable, leave=False)
