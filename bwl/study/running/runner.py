"""The runner: execute the study's notebooks in order with papermill for one profile.

``python -m bwl run --profile toy`` keeps the executed notebooks under ``runs/<profile>/notebooks/``; a failed
notebook stops the run, naming the notebook and the cell, and is left there for inspection.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import papermill
from papermill.exceptions import PapermillExecutionError

from bwl.core.config import ConfigError
from bwl.study.design.profile import ROOT, load_profile
from bwl.study.running.console import console_for_kernels

NOTEBOOKS = ("01_data_preparation.ipynb", "02_training.ipynb", "03_ablation_grids.ipynb", "04_figures.ipynb")


class StudyFailed(RuntimeError):
    """A notebook of the study failed."""


def run_study(profile: str = "toy", overrides: dict | None = None, notebooks: tuple[str, ...] = NOTEBOOKS) -> Path:
    """Run the notebooks for ``profile``; returns the folder of executed notebooks."""
    settings = load_profile(profile, overrides)  # fails early on unknown keys
    if len(settings.pairs) > 1:
        raise ConfigError(f"profile {settings.name} lists {len(settings.pairs)} concept pairs: the notebooks run one "
                          f"study; run the replicated study with: python -m bwl replicate --profile {settings.name}")
    out = settings.out / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for i, name in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {name} (profile {settings.name})", flush=True)
        t0 = time.time()
        with console_for_kernels():
            try:
                papermill.execute_notebook(
                    str(ROOT / "notebooks" / name), str(out / name), kernel_name="python3", cwd=str(ROOT / "notebooks"),
                    parameters={"profile": profile, "overrides": json.loads(json.dumps(overrides or {})),
                                "interactive": False},
                    progress_bar=False, log_output=False,  # the study's own lines reach the console (console.log)
                    # not the kernel's TCP warning at every start, nor its "KeyboardInterrupt caught" when it is shut
                    # down idle: a failed cell reaches the console as StudyFailed, a dead kernel as nbclient's error
                    extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
                )
            except PapermillExecutionError as err:
                raise StudyFailed(
                    f"{name} failed in cell {err.exec_count} ({err.ename}: {err.evalue}); "
                    f"the executed notebook is kept at {out / name}"
                ) from None
            except OSError as err:  # writing the executed notebook (a full disk): papermill's own write
                raise StudyFailed(f"{name}: {err.strerror or err} while writing {out / name} (or the notebook "
                                  "it reports from)") from None
        print(f"[{i}/{len(notebooks)}] {name} done in {time.time() - t0:.0f} s", flush=True)
    print(f"study {settings.name} finished in {(time.time() - started) / 60:.1f} min; figures in {settings.figures}",
          flush=True)
    return out
