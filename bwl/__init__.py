"""bwl: block-wise LoRA/LoCon for Stable Diffusion 1.x (Li et al., arXiv 2403.07500)."""

__version__ = "0.1.0"
