"""What every study notebook does first, in one call after its ``parameters`` cell: refuse unknown papermill
parameters, load the profile, report the device, and hand back the :class:`~bwl.study.running.study.Study`."""

from __future__ import annotations

import torch
from IPython import get_ipython

from bwl.core.config import ConfigError, parse_value
from bwl.study.design.profile import load_profile
from bwl.study.running.console import show_progress
from bwl.study.running.study import Study

NOTEBOOK_PARAMETERS = ("profile", "overrides", "interactive")
PAPERMILL_TYPES = (str, int, float, bool, list, dict, type(None))  # what a -p value can be (modules are not)
_checked: set[int] = set()  # namespaces already checked: a rerun in JupyterLab sees the notebook's own variables


def unknown_parameters(namespace: dict, declared: tuple[str, ...] = NOTEBOOK_PARAMETERS) -> list[str]:
    """Variables of ``namespace`` that papermill's ``-p`` could have set but the notebook does not declare.

    Run right after the parameters cell, the only such variables are the declared parameters, papermill's injected
    ones, and IPython's own (``In``, ``Out``, …, listed in its ``user_ns_hidden``).
    """
    shell = get_ipython()
    hidden = set(shell.user_ns_hidden) if shell is not None else set()
    return sorted(k for k, v in namespace.items() if k not in declared and k not in hidden and not k.startswith("_")
                  and isinstance(v, PAPERMILL_TYPES))


def setup(profile: str, overrides: dict | str | None = None, namespace: dict | None = None) -> Study:
    """The study for ``profile`` + ``overrides``; with ``namespace`` (the notebook's ``globals()``), unknown papermill
    parameters in it are a ``ConfigError`` naming them (papermill itself only warns), and its ``interactive`` decides
    whether long stages draw progress bars."""
    if namespace is not None and id(namespace) not in _checked:
        _checked.add(id(namespace))
        unknown = unknown_parameters(namespace)
        if unknown:
            raise ConfigError(f"unknown notebook parameter(s) {', '.join(map(repr, unknown))}; valid: "
                              f"{', '.join(NOTEBOOK_PARAMETERS)} (profile keys go inside overrides, e.g. "
                              "-p overrides '{\"seeds\": [0, 1]}')")
    if isinstance(overrides, str):  # papermill's -p passes text: '{"seeds": [0, 1]}'
        overrides = parse_value(overrides)
    if not isinstance(overrides, dict | None):
        raise ConfigError(f"overrides must be a mapping of profile keys, got {overrides!r}")
    show_progress(bool(namespace.get("interactive", True)) if namespace is not None else True)
    study = Study(load_profile(profile, overrides))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"profile {study.profile.name}: model {study.profile.model}, {study.profile.resolution} px; device: {device}")
    return study
