"""The study: profiles, the paper's grids as typed cells, adapters keyed by their resolved config, one
generate -> score -> save path for cells, results with confidence intervals, the claims C1-C3, figures, the block
sweep, the notebooks' setup and the papermill runner. The top layer: it may import every other one.

Stages, in data-flow order: ``profile`` -> ``study`` (data, adapters via ``runs`` and ``workers``, cells via
``cells`` and ``metrics``) -> ``results`` -> ``findings``, ``gates``, ``figures``, ``reports``; ``sweep`` reuses the
cell path; ``notebook``, ``runner``, ``console`` and ``explorer`` serve the notebooks; ``vocabulary`` names it all.
"""

from bwl.study.notebook import setup
from bwl.study.profile import Profile, load_profile
from bwl.study.results import CellResult
from bwl.study.runner import StudyFailed, run_study
from bwl.study.study import Study
from bwl.study.vocabulary import GRIDS, METRICS, AdapterKey, Cell, Concept, Grid, Metric

__all__ = ["GRIDS", "METRICS", "AdapterKey", "Cell", "CellResult", "Concept", "Grid", "Metric", "Profile", "Study",
           "StudyFailed", "load_profile", "run_study", "setup"]
