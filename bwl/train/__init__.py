"""Training: one block-wise adapter from a :class:`TrainConfig`, with cached latents, exact resume and the speed
choices of :mod:`bwl.train.fast`. Above the toolkit (:mod:`bwl.adapters`) and data prep (:mod:`bwl.data`).

``config`` is the run's settings, ``run`` the prepared run and its step, ``loop`` the loop with checkpoints,
``losses`` the loss log, ``cache`` the latent and text caches, ``checkpoint`` the state files.
"""

from bwl.train.config import TrainConfig
from bwl.train.loop import TrainingDiverged, train
from bwl.train.losses import plot_loss_curve
from bwl.train.run import TrainingRun

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingRun", "plot_loss_curve", "train"]
