"""The runner: execute the study's notebooks in order with papermill for one profile.

``python -m bwl run --profile toy`` keeps the executed notebooks under ``runs/<profile>/notebooks/``; a failed
notebook stops the run, naming the notebook and the cell, and is left there for inspection.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .study import ROOT, load_profile

NOTEBOOKS = ("01_data_preparation.ipynb", "02_training.ipynb", "03_ablation_grids.ipynb", "04_figures.ipynb")


def _echo_cell_output() -> None:
    """Show what the notebooks print (papermill logs cell output at INFO) as indented plain lines."""
    logger = logging.getLogger("papermill")
    if not any(getattr(h, "bwl", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler.bwl = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


NOTEBOOK_PARAMETERS = ("profile", "overrides", "interactive")
PAPERMILL_TYPES = (str, int, float, bool, list, dict, type(None))  # what a -p value can be (imports are not)


class ParameterGuard:
    """Refuses papermill parameters a notebook does not declare (papermill itself only warns).

    Made in the setup cell, before the ``parameters`` cell; :meth:`check`, in the cell after the parameters, names
    every variable that appeared in between other than the declared parameters: those came from ``-p``.
    """

    def __init__(self, namespace: dict):
        self.before = set(namespace)
        self.checked = False

    def check(self, namespace: dict, declared: tuple[str, ...] = NOTEBOOK_PARAMETERS) -> None:
        if self.checked:  # re-running the cell later in JupyterLab sees the notebook's own variables
            return
        self.checked = True
        unknown = sorted(k for k, v in namespace.items() if k not in self.before and k not in declared
                         and not k.startswith("_") and isinstance(v, PAPERMILL_TYPES))
        if unknown:
            from .config import ConfigError

            raise ConfigError(f"unknown notebook parameter(s) {', '.join(map(repr, unknown))}; valid: {', '.join(declared)} "
                              "(profile keys go inside overrides, e.g. -p overrides '{\"seeds\": [0, 1]}')")


class StudyFailed(RuntimeError):
    """A notebook of the study failed."""


def run_study(profile: str = "toy", overrides: dict | None = None, notebooks: tuple[str, ...] = NOTEBOOKS) -> Path:
    """Run the notebooks for ``profile``; returns the folder of executed notebooks."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    settings = load_profile(profile, overrides)  # fails early on unknown keys
    _echo_cell_output()
    out = settings.out / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for i, name in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {name} (profile {settings.name})", flush=True)
        t0 = time.time()
        try:
            papermill.execute_notebook(
                str(ROOT / "notebooks" / name), str(out / name), kernel_name="python3", cwd=str(ROOT / "notebooks"),
                parameters={"profile": profile, "overrides": json.loads(json.dumps(overrides or {})), "interactive": False},
                progress_bar=False, log_output=True,
            )
        except PapermillExecutionError as err:
            raise StudyFailed(
                f"{name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                f"the executed notebook is kept at {out / name}"
            ) from None
        print(f"[{i}/{len(notebooks)}] {name} done in {time.time() - t0:.0f} s", flush=True)
    print(f"study {settings.name} finished in {(time.time() - started) / 60:.1f} min; figures in {settings.path(settings.figures_dir)}", flush=True)
    return out
