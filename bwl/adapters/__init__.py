"""The adapter toolkit: the paper's blocks, block-wise LoRA/LoCon through peft, adapter files, several adapters
combined per block, and kohya/A1111 interchange. Above :mod:`bwl.core`; imports neither the study nor the toy world.

``bwl.adapters.blocks`` is the vocabulary (torch-free), ``spec`` turns an :class:`AdapterSpec` into a peft config,
``text_encoder`` does the same for the text encoder (BASE), ``files`` reads and writes ``.safetensors`` adapters and
``metadata`` validates what they say, ``modules`` reads any file module by module and checks it fits a model,
``compose`` loads several and scales them per block, ``kohya`` converts, ``report`` inspects.
"""

from bwl.adapters.blocks import GROUPS, PAPER_BLOCKS, BlockSpecError, block_weights, parse_blocks
from bwl.adapters.compose import load_adapter, load_adapters, set_block_weights
from bwl.adapters.files import AdapterFileError, read_info, save_adapter
from bwl.adapters.kohya import export_kohya, import_kohya
from bwl.adapters.report import inspect_adapter
from bwl.adapters.spec import AdapterSpec, adapted_modules, add_adapter, find_targets, parameters_per_block

__all__ = [
    "GROUPS",
    "PAPER_BLOCKS",
    "AdapterFileError",
    "AdapterSpec",
    "BlockSpecError",
    "adapted_modules",
    "add_adapter",
    "block_weights",
    "export_kohya",
    "find_targets",
    "import_kohya",
    "inspect_adapter",
    "load_adapter",
    "load_adapters",
    "parameters_per_block",
    "parse_blocks",
    "read_info",
    "save_adapter",
    "set_block_weights",
]
