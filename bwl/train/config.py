"""Everything that determines a training run, as one dataclass (flat, so YAML files and the CLI set it directly)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from bwl.adapters.spec import AdapterSpec
from bwl.core.config import coerce_fields, require
from bwl.sd.pipeline import PAPER_MODEL

# Fields that change where a run writes, how often it reports or saves, or whether it continues, but not the adapter
# it trains (checkpoints restore exactly, so saving them changes nothing). Every other field is part of a run's key.
RESULT_NEUTRAL_FIELDS = frozenset({"output_dir", "resume", "stop_after", "log_every", "checkpoint_every",
                                   "keep_checkpoints", "sample_every", "sample_prompts", "log_with"})


@dataclass
class TrainConfig:
    """Everything that determines a training run. Defaults are the paper's (the learning rate is ours)."""

    output_dir: str = "runs/train"
    model: str = PAPER_MODEL
    instance_dir: str = "data/identity"
    trigger: str = "sks"
    class_word: str = ""
    repeats: int = 25
    reg_dir: str | None = None
    prior_loss_weight: float = 1.0
    method: Literal["lora", "locon"] = "lora"
    blocks: str = "all"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    block_ranks: dict[str, int] = field(default_factory=dict)
    train_text_encoder: bool = False  # the paper trains the U-Net only; kohya both, unless network_train_unet_only
    text_encoder_lr: float | None = None  # kohya's text_encoder_lr; None: learning_rate
    resolution: int = 512
    random_flip: bool = False
    random_crop: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0
    steps: int = 11000
    batch_size: int = 2
    learning_rate: float = 1e-4  # the paper gives none; 1e-4 is the common LoRA DreamBooth value
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    channels_last: bool | None = None  # None: on for CUDA, off on CPU (where it is slower)
    compile_unet: bool = False  # TorchInductor; a compile failure falls back to eager with a warning (fast.compile)
    compile_backend: str = "inductor"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    norms_in_compute_dtype: bool = True  # under mixed precision, GroupNorm/LayerNorm in bf16/fp16 (autocast_norms)
    cpu_convolutions: Literal["auto", "onednn", "native"] = "auto"  # auto: native kernels for tiny convs
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    fixed_timestep: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: Literal["tensorboard", "wandb"] | None = None  # accelerate's trackers; logs under <output_dir>/logs
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    resume: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        coerce_fields(self)  # "1e-3" from YAML or a flag becomes 0.001; "abc" for steps is a ConfigError
        positive = "an integer >= 1"
        require(self, [
            ("steps", self.steps >= 1, positive), ("batch_size", self.batch_size >= 1, positive),
            ("repeats", self.repeats >= 1, positive), ("rank", self.rank >= 1, positive),
            ("resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a positive multiple of 8"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("text_encoder_lr", self.text_encoder_lr is None or self.text_encoder_lr > 0, "None or > 0"),
            ("conv_rank", self.conv_rank is None or self.conv_rank >= 1, f"None or {positive}"),
            ("alpha", self.alpha is None or self.alpha > 0, "None or > 0"),
            ("conv_alpha", self.conv_alpha is None or self.conv_alpha > 0, "None or > 0"),
            ("lr_warmup_steps", self.lr_warmup_steps >= 0, ">= 0"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
            ("adam_weight_decay", self.adam_weight_decay >= 0, ">= 0"), ("adam_epsilon", self.adam_epsilon > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
            ("prior_loss_weight", self.prior_loss_weight >= 0, ">= 0"),
            ("caption_dropout", 0 <= self.caption_dropout <= 1, "in [0, 1]"),
            ("keep_tokens", self.keep_tokens >= 0, ">= 0"),
            ("fixed_timestep", self.fixed_timestep is None or 0 <= self.fixed_timestep < 1000, "None or in [0, 1000)"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0: no checkpoints)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, positive), ("log_every", self.log_every >= 1, positive),
            ("sample_every", self.sample_every >= 0, ">= 0 (0: no samples)"),
            ("stop_after", self.stop_after is None or self.stop_after >= 1, f"None or {positive}"),
        ])

    def adapter_spec(self) -> AdapterSpec:
        """The adapter part of this config (its keys are AdapterSpec's, kept flat for YAML and the CLI)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterSpec) if f.name != "text_encoder"}
        return AdapterSpec(**values, text_encoder=self.train_text_encoder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_values(self) -> dict:
        """Every field that can change the trained adapter, defaults included (all but ``RESULT_NEUTRAL_FIELDS``)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESULT_NEUTRAL_FIELDS}
