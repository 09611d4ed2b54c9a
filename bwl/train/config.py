"""Everything that determines a training run, as one dataclass (flat, so YAML files and the CLI set it directly)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from bwl.adapters.architectures import ARCHITECTURES, ArchitectureLike, get_architecture
from bwl.adapters.block_lr import block_lr_weights, zero_lr_blocks
from bwl.adapters.blocks import BlockSpecError
from bwl.adapters.methods import get_method
from bwl.adapters.spec import AdapterSpec
from bwl.core.config import ConfigError, coerce_fields, require
from bwl.sd.pipeline import PAPER_MODEL

# Fields that change where a run writes, how often it reports or saves, or whether it continues, but not the adapter
# it trains (checkpoints restore exactly, so saving them changes nothing). Every other field is part of a run's key.
RESULT_NEUTRAL_FIELDS = frozenset({"output_dir", "resume", "stop_after", "log_every", "checkpoint_every",
                                   "keep_checkpoints", "sample_every", "sample_prompts", "log_with"})
# Fields added after adapters were first keyed, with the value at which they train exactly what bwl trained before
# they existed: they enter a run's key only when set otherwise, so existing adapters keep their keys. These
# defaults must never change.
KEYED_WHEN_SET = {"dora": False, "block_lr": None, "block_lr_zero_threshold": 0.0, "loraplus_lr_ratio": None,
                  "joint_dir": None, "joint_trigger": ""}


@dataclass
class TrainConfig:
    """Everything that determines a training run. Defaults are the paper's (the learning rate is ours)."""

    output_dir: str = "runs/train"
    model: str = PAPER_MODEL
    instance_dir: str = "data/identity"
    trigger: str = "sks"
    joint_dir: str | None = None  # joint training: a second concept's images in the same adapter
    joint_trigger: str = ""  # its trigger (the fallback caption of its uncaptioned images)
    class_word: str = ""
    repeats: int = 25
    reg_dir: str | None = None
    prior_loss_weight: float = 1.0
    method: Literal["lora", "locon", "loha", "lokr", "oft"] = "lora"
    dora: bool = False  # DoRA on lora/locon (peft's use_dora; LyCORIS' dora_wd)
    blocks: str = "all"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    block_ranks: dict[str, int] = field(default_factory=dict)
    block_lr: str | dict | list[float] | None = None  # per-block LR multipliers: a kohya preset, down/mid/up, blocks
    block_lr_zero_threshold: float = 0.0  # kohya's: a multiplier at or below it is 0, and its block is not created
    loraplus_lr_ratio: float | None = None  # LoRA+: LoRA's B matrices at this multiple of the learning rate
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
            ("loraplus_lr_ratio", self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0, "None or > 0"),
            ("loraplus_lr_ratio", self.loraplus_lr_ratio is None or get_method(self.method).peft_type == "LORA",
             f"unset for method {self.method!r} (LoRA+ speeds up LoRA's B matrices; {self.method} has none)"),
        ])
        try:
            for arch in ARCHITECTURES.values():  # valid in some layout; the model's is checked when it is loaded
                try:
                    block_lr_weights(self.block_lr, self.block_lr_zero_threshold, arch)
                    break
                except BlockSpecError:
                    if arch is list(ARCHITECTURES.values())[-1]:
                        raise
        except BlockSpecError as err:
            raise ConfigError(f"block_lr={self.block_lr!r} is not valid: {err}") from None

    def adapter_spec(self, arch: ArchitectureLike | None = None) -> AdapterSpec:
        """The adapter part of this config (its keys are AdapterSpec's, kept flat for YAML and the CLI), in layout
        ``arch`` where given (the model's; it is not part of the config). Fine blocks whose learning-rate multiplier
        is 0 are not created (rank 0), as kohya does."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterSpec)
                  if f.name not in ("text_encoder", "architecture")}
        zero = zero_lr_blocks(self.block_lr, self.block_lr_zero_threshold, arch)
        values["block_ranks"] = {**self.block_ranks, **dict.fromkeys(zero, 0)}
        architecture = get_architecture(arch).name if arch is not None else None
        return AdapterSpec(**values, text_encoder=self.train_text_encoder, architecture=architecture)

    def block_lr_weights(self, arch: ArchitectureLike | None = None) -> dict[str, float]:
        """The learning-rate multiplier of each kohya fine block of ``arch`` (SD 1.x by default)."""
        return block_lr_weights(self.block_lr, self.block_lr_zero_threshold, arch)

    def training_metadata(self, arch: ArchitectureLike | None = None) -> dict[str, str]:
        """What an adapter file records about how it was trained, beyond its spec (per-block LR, LoRA+)."""
        metadata = {}
        if self.block_lr is not None:
            metadata["bwl_block_lr"] = json.dumps(self.block_lr_weights(arch))
        if self.loraplus_lr_ratio is not None:
            metadata["bwl_loraplus_lr_ratio"] = f"{self.loraplus_lr_ratio:g}"
        return metadata

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_values(self) -> dict:
        """Every field that can change the trained adapter, defaults included (all but ``RESULT_NEUTRAL_FIELDS``, and
        the ``KEYED_WHEN_SET`` fields at their neutral values)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RESULT_NEUTRAL_FIELDS and not (k in KEYED_WHEN_SET and v == KEYED_WHEN_SET[k])}
