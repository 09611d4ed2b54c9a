"""Block-wise adapter training, top to bottom: a :class:`~bwl.train.run.TrainingRun` stepped with logging, NaN
checks and checkpoints (adapter, optimizer, LR schedule, RNG, step), then the final adapter file with its config
beside it. ``resume=True`` continues from the last checkpoint and ends bit-identical to an uninterrupted run (CPU).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict
from tqdm import tqdm

from bwl import __version__
from bwl.adapters.files import TextEncoders, adapter_state_dict, encoders_by_name, save_adapter
from bwl.core.atomic import atomic_path, write_json
from bwl.core.images import image_row
from bwl.sd.pipeline import Pipeline
from bwl.train.checkpoint import latest, load_state, save_state
from bwl.train.config import TrainConfig
from bwl.train.losses import LossLog
from bwl.train.run import ADAPTER, TrainingRun


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --- checkpoints: one safetensors file each, written atomically -------------------------------------------------


def save_checkpoint(path: Path, run: TrainingRun, step: int) -> None:
    """Adapter (U-Net and any text encoder), optimizer, LR schedule, RNG states and step in one safetensors file."""
    tensors = adapter_state_dict(run.unet, ADAPTER, run.text_encoders if run.spec.text_encoder else None)
    save_state(path, tensors, run.optimizer, run.lr_scheduler, step, {"config": json.dumps(run.config.to_dict())})


def load_checkpoint(
    path: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
    text_encoder: TextEncoders = None,
) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` (``text_encoder``: the text encoder, or SDXL's two by
    pipeline attribute, where they were trained too); returns its step."""
    tensors, step, _ = load_state(path, optimizer, lr_scheduler)
    encoders = encoders_by_name(text_encoder)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        prefix, model = component + ".", unet if component == "unet" else encoders.get(component)
        adapter = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not adapter:
            continue
        if model is None:
            raise RuntimeError(f"{path}: checkpoint holds text-encoder LoRA; this run does not train the text encoder")
        result = set_peft_model_state_dict(model, adapter, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{path}: checkpoint does not match this adapter ({result.unexpected_keys[:3]} ...)")
    return step


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return latest(output_dir / "checkpoints")


def train(config: TrainConfig, pipe: Pipeline | None = None) -> Path:
    """Train one block-wise adapter; returns the final adapter file (``<output_dir>/adapter.safetensors``)."""
    out = Path(config.output_dir)
    run = TrainingRun(config, pipe)
    accelerator, unet, lr_scheduler = run.accelerator, run.unet, run.lr_scheduler

    start = 0
    existing = checkpoints(out)
    if config.resume and existing:
        start = load_checkpoint(existing[-1], unet, run.optimizer, lr_scheduler,
                                run.text_encoders if run.spec.text_encoder else None)
        print(f"resumed from {existing[-1]} at step {start}", flush=True)
    elif (out / "adapter.safetensors").exists() or existing:
        raise FileExistsError(f"{out}: already holds a run; pass resume=True to continue it or choose a new output_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, run)
    log = LossLog(out, start)
    if config.log_with:  # TensorBoard (or W&B) through accelerate's trackers, with the run's settings as hparams
        hparams = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(out.name or "train", config=hparams)

    end = min(config.steps, config.stop_after or config.steps)
    progress = tqdm(
        total=config.steps,
        initial=start,
        desc=f"train {run.spec.method} {run.spec.blocks}",
        file=sys.stdout,
        disable=not sys.stdout.isatty(),
        dynamic_ncols=True,
    )
    running, count, last_good, t0 = torch.zeros((), device=run.device), 0, start, time.time()
    for step in range(start, end):
        running += run.step(step)
        count += 1
        if step == start and run.compiled is not None and run.compiled.fallback:
            write_run_config(out, run)  # the config records that this run trained eagerly
        done = step + 1
        if done % config.log_every == 0 or done == end:
            mean_loss = (running / count).item()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(
                    f"loss became {mean_loss} between steps {done - count + 1} and {done}; "
                    f"kept the last good checkpoint (step {last_good}) in {out / 'checkpoints'}"
                )
            log.write(done, mean_loss, lr_scheduler.get_last_lr()[0])
            if config.log_with:
                accelerator.log({"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=done)
            progress.update(done - progress.n)
            if not sys.stdout.isatty():
                print(
                    f"step {done}/{config.steps} loss {mean_loss:.4f} ({(time.time() - t0) / count:.3f} s/step)",
                    flush=True,
                )
            running, count, t0 = torch.zeros((), device=run.device), 0, time.time()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            if count:
                pending = (running / count).item()
                if not math.isfinite(pending):
                    raise TrainingDiverged(
                        f"loss became {pending} before step {done}; kept checkpoint step {last_good}"
                    )
            if accelerator.is_main_process:
                save_checkpoint(out / "checkpoints" / f"checkpoint-{done:07d}.safetensors", run, done)
                for old in checkpoints(out)[: -config.keep_checkpoints]:
                    old.unlink()
            last_good = done
        if config.sample_every and config.sample_prompts and done % config.sample_every == 0:
            save_samples(run.pipe, config, out / "samples" / f"step-{done:07d}.png")
    progress.close()
    log.close()
    if config.log_with:
        accelerator.end_training()
    if end < config.steps:
        if accelerator.is_main_process and not (out / "checkpoints" / f"checkpoint-{end:07d}.safetensors").exists():
            save_checkpoint(out / "checkpoints" / f"checkpoint-{end:07d}.safetensors", run, end)
        print(f"stopped at step {end} of {config.steps}; rerun with resume=True to continue", flush=True)
        return out / "checkpoints" / f"checkpoint-{end:07d}.safetensors"
    final = out / "adapter.safetensors"
    if accelerator.is_main_process:
        save_adapter(unet, final, run.spec, ADAPTER, base_model=config.model, trigger=config.trigger,
                     steps=config.steps, text_encoder=run.text_encoders if run.spec.text_encoder else None,
                     training=config.training_metadata(run.spec.arch))
    return final


def write_run_config(out: Path, run: TrainingRun) -> None:
    """``config.json`` beside the run's outputs: its full config, adapter spec, and the choices the run made."""
    write_json(out / "config.json", {"bwl_version": __version__, "train": run.config.to_dict(),
                                     "adapter": run.spec.to_dict(), **run.record()})


def save_samples(pipe: Pipeline, config: TrainConfig, path: Path) -> None:
    """A row of sample images for the configured prompts at a fixed seed."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    images = pipe(config.sample_prompts, num_inference_steps=25, guidance_scale=7.0,
                  generator=torch.Generator().manual_seed(config.seed)).images
    pipe.unet.train(was_training)
    with atomic_path(path) as tmp:
        image_row(images).save(tmp, format="PNG")
