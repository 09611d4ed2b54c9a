"""bwl: block-wise LoRA/LoCon for Stable Diffusion 1.x (Li et al., arXiv 2403.07500).

Layers, lowest first; a layer imports only those before it (``tests/test_layers.py`` checks this):

- ``bwl.core``: atomic writes, configs, hashes, image grids;
- ``bwl.sd``: SD 1.x pipelines with the paper's sampler, generation, tiny test pipelines;
- ``bwl.adapters``: the toolkit (blocks, block-wise LoRA/LoCon, adapter files, composition, kohya interchange);
- ``bwl.data``: data prep (datasets, tagging, captions, the caption editor, regularization images);
- ``bwl.train``: training, with its speed choices in ``bwl.train.fast``;
- ``bwl.toy``: the toy world (world, micro SD pretraining, probe);
- ``bwl.study``: the study (profiles, grids, cells, metrics, results, findings, figures, sweep, notebooks' setup).
"""

import logging

__version__ = "0.1.0"

# transformers warns at import, once per process (the study's worker processes included), that torchvision is missing
# and it falls back to PIL image processors; bwl uses no image processor, so that one message is dropped.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
