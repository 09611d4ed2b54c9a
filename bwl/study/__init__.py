"""The study: the toy world's and the paper's experiments on block-wise LoRA. The top layer: it may import every
other one. Inside, rooms by role, each importing only the rooms before it:

``design`` (vocabulary, profiles, run keys) -> ``scoring`` (metric families, statistics, results, claims, pooling)
-> ``running`` (stages, cells, workers, processes, locks, notebooks' setup, papermill runner) -> ``experiments``
(sweep, methods, lengths, replication, eye-check, analyzer, gates, validation) -> ``presentation`` (figures,
tables, explorer, demo).
"""

from bwl.study.design.profile import Profile, load_profile
from bwl.study.design.vocabulary import GRIDS, METRICS, AdapterKey, Cell, Concept, Grid, Metric
from bwl.study.running.notebook import setup
from bwl.study.running.runner import StudyFailed, run_study
from bwl.study.running.study import Study
from bwl.study.scoring.results import CellResult

__all__ = ["GRIDS", "METRICS", "AdapterKey", "Cell", "CellResult", "Concept", "Grid", "Metric", "Profile", "Study",
           "StudyFailed", "load_profile", "run_study", "setup"]
