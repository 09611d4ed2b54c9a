import csv
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bwl.adapters.blocks import paper_block
from bwl.adapters.files import read_info, read_tensors
from bwl.core.config import ConfigError, build
from bwl.toy.assets import TOY_MODEL
from bwl.train import TrainConfig, TrainingDiverged, train
from bwl.train.batches import prepare_data
from bwl.train.loop import checkpoints, load_checkpoint

from .conftest import assert_float32_equal, float32_bound
from .test_data import write_images


def config(tmp_path, tiny_dir, **overrides) -> TrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), model=str(tiny_dir), instance_dir=str(tmp_path / "images"),
                  resolution=64, steps=20, batch_size=2, repeats=2, checkpoint_every=0, log_every=5, learning_rate=1e-3)
    values.update(overrides)
    if not (tmp_path / "images").exists():
        write_images(tmp_path / "images", count=3)
    return TrainConfig(**values)


def losses(run_dir):
    with open(run_dir / "loss.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_overfitting_one_image_halves_the_loss(tmp_path, tiny_dir):
    write_images(tmp_path / "images", count=1)
    cfg = config(tmp_path, tiny_dir, steps=100, repeats=1, batch_size=1, fixed_timestep=500, rank=8, learning_rate=1e-2)
    train(cfg)
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.5 * curve[0], curve


def test_base_weights_untouched_and_no_lora_outside_blocks(tmp_path, tiny_dir, pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    final = train(config(tmp_path, tiny_dir, method="locon", blocks="upper"), pipe=pipe)
    after = pipe.unet.state_dict()
    for key, value in before.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(value, after.get(key, after.get(peft_key))), key
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te_before.items())
    tensors = read_tensors(final)
    assert {paper_block(k[len("unet."):]) for k in tensors} == {"IN0", "OUT3"}
    assert read_info(final).spec.blocks == "upper"
    assert (tmp_path / "run" / "config.json").exists()


def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path, tiny_dir):
    straight = train(
        config(
            tmp_path,
            tiny_dir,
            output_dir=str(tmp_path / "a"),
            steps=60,
            checkpoint_every=30,
            random_flip=True,
            shuffle_tags=True,
        )
    )
    resumable = config(
        tmp_path,
        tiny_dir,
        output_dir=str(tmp_path / "b"),
        steps=60,
        checkpoint_every=30,
        random_flip=True,
        shuffle_tags=True,
    )
    resumable.stop_after = 30
    stopped = train(resumable)
    assert stopped.name == "checkpoint-0000030.safetensors" and not (tmp_path / "b" / "adapter.safetensors").exists()
    resumable.stop_after, resumable.resume = None, True
    resumed = train(resumable)
    a, b = read_tensors(straight), read_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_crash_during_checkpoint_save_keeps_the_previous_one(tmp_path, tiny_dir, monkeypatch, pipe):
    import bwl.train.checkpoint as checkpoint_module

    real_save = checkpoint_module.save_file
    calls = []

    def crashing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("killed while saving")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, tiny_dir, steps=40, checkpoint_every=10), pipe=pipe)
    kept = checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["checkpoint-0000010.safetensors"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    load_file(str(kept[0]))
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    cfg = config(tmp_path, tiny_dir, steps=40, checkpoint_every=10, resume=True)
    assert train(cfg).name == "adapter.safetensors"


class EncoderCounter:
    def __init__(self, vae):
        self.images = 0
        vae.encoder.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += inputs[0].shape[0]


@pytest.mark.parametrize("cache, flip, expected", [(True, True, 6), (True, False, 3), (False, False, 40)])
def test_vae_encodes_once_per_image_and_flip_when_cached(tmp_path, tiny_dir, pipe, cache, flip, expected):
    counter = EncoderCounter(pipe.vae)
    train(config(tmp_path, tiny_dir, steps=20, batch_size=2, cache_latents=cache, random_flip=flip), pipe=pipe)
    assert counter.images == expected


def test_cached_and_uncached_give_the_same_losses(tmp_path, tiny_dir):
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "c"), cache_latents=True, random_flip=True))
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "u"), cache_latents=False, random_flip=True))
    assert losses(tmp_path / "c") == pytest.approx(losses(tmp_path / "u"), rel=1e-4)


def test_regularisation_images_balance_the_instances(tmp_path, tiny_dir):
    write_images(tmp_path / "reg", count=5, caption="dog")
    cfg = config(tmp_path, tiny_dir, reg_dir=str(tmp_path / "reg"), repeats=3, prior_loss_weight=0.5)
    data = prepare_data(cfg)
    reg = [i for i in data.order if data.examples[i].is_reg]
    assert len(data.order) == 2 * 3 * 3 and len(reg) == 9
    train(cfg)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tiny_dir, monkeypatch):
    import bwl.train.run as train_module

    real_loss = train_module.denoising_loss
    seen = []

    def poisoned(*args, **kwargs):
        seen.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(seen) > 12 else loss

    monkeypatch.setattr(train_module, "denoising_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"between steps 11 and 15.*step 10"):
        train(config(tmp_path, tiny_dir, steps=30, checkpoint_every=10))
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["checkpoint-0000010.safetensors"]


def test_existing_run_is_not_overwritten(tmp_path, tiny_dir):
    train(config(tmp_path, tiny_dir, steps=5))
    with pytest.raises(FileExistsError, match="resume"):
        train(config(tmp_path, tiny_dir, steps=5))


def test_real_photos_train_a_few_steps(tmp_path, tiny_dir, dreambooth):
    shutil.copytree(dreambooth / "dog", tmp_path / "images")
    with pytest.warns(UserWarning, match="no caption file"):
        final = train(config(tmp_path, tiny_dir, steps=4, trigger="sks", class_word="dog", random_flip=True))
    assert read_info(final).trigger == "sks"


def test_config_file_and_cli(tmp_path, tiny_dir):
    from bwl.__main__ import main

    write_images(tmp_path / "images", count=2)
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_dir}\ninstance_dir: {tmp_path / 'images'}\nresolution: 64\nsteps: 3\nlog_every: 1\n"
        f"checkpoint_every: 0\nblocks: middle\nblock_ranks: {{IN1: 2}}\n"
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "run.yaml"),
                "--output-dir",
                str(tmp_path / "cli"),
                "--method",
                "locon",
            ]
        )
        == 0
    )
    info = read_info(tmp_path / "cli" / "adapter.safetensors")
    assert info.spec.method == "locon" and info.spec.blocks == "middle" and info.block_ranks["IN04"] == 2
    with pytest.raises(ConfigError, match="'stepz'.*valid: output_dir"):
        build(TrainConfig, {"stepz": 3})


def test_checkpoint_restores_optimizer_and_schedule(tmp_path, tiny_dir, pipe):
    train(
        config(tmp_path, tiny_dir, steps=20, checkpoint_every=10, lr_scheduler="cosine", lr_warmup_steps=2), pipe=pipe
    )
    from diffusers.optimization import get_scheduler

    from bwl.adapters.spec import add_adapter
    from bwl.sd.pipeline import load_pipeline

    fresh = load_pipeline(tiny_dir)
    cfg = config(tmp_path, tiny_dir)
    add_adapter(fresh.unet, cfg.adapter_spec(), "default")
    optimizer = torch.optim.AdamW([p for p in fresh.unet.parameters() if p.requires_grad], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=20)
    step = load_checkpoint(checkpoints(tmp_path / "run")[-1], fresh.unet, optimizer, schedule)
    assert step == 10 and schedule.last_epoch == 10
    assert all(int(s["step"]) == 10 for s in optimizer.state_dict()["state"].values())


def test_v_prediction_target_follows_the_scheduler_config(tmp_path, tiny_dir, pipe):
    from diffusers import DDPMScheduler

    from bwl.train.run import denoising_loss

    latents = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 32)
    eps = DDPMScheduler.from_config(pipe.scheduler.config)
    v = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    def zero_unet(noisy, t, text):
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()

    def g():
        return torch.Generator().manual_seed(0)

    noise = torch.randn(latents.shape, generator=g())
    assert denoising_loss(zero_unet, eps, latents, text, g(), fixed_timestep=500).item() == pytest.approx(
        noise.pow(2).mean().item()
    )
    velocity = v.get_velocity(latents, noise, torch.full((2,), 500))
    assert denoising_loss(zero_unet, v, latents, text, g(), fixed_timestep=500).item() == pytest.approx(
        velocity.pow(2).mean().item()
    )


def first_step(cfg: TrainConfig, float64: bool = False) -> tuple[float, torch.Tensor, float, torch.Tensor]:
    """Loss and adapter gradients (flattened, by parameter name) of step 0, before any optimizer update; with
    ``float64``, also those of the same U-Net, adapter and batch in float64 (the reference for rounding)."""
    import copy

    from bwl.train.run import TrainingRun, denoising_loss

    run = TrainingRun(cfg)
    latents, text, weights, generator = run.batch(0)
    with run.kernels():
        loss = denoising_loss(run.forward_unet, run.noise_scheduler, latents, text, generator, None, weights)
        loss.backward()
    names = sorted(n for n, p in run.unet.named_parameters() if p.requires_grad)
    grads = dict(run.unet.named_parameters())
    flat = torch.cat([grads[n].grad.flatten() for n in names])
    if not float64:
        return loss.item(), flat, math.nan, torch.empty(0)
    unet = copy.deepcopy(run.unet).double()
    latents, text, weights, generator = run.batch(0)  # the same draws, from the step's seed
    exact = denoising_loss(
        unet, run.noise_scheduler, latents.double(), text.double(), generator, None, weights.double()
    )
    exact.backward()
    params = dict(unet.named_parameters())
    return loss.item(), flat, exact.item(), torch.cat([params[n].grad.flatten().float() for n in names])


@pytest.mark.parametrize("option", [
    {"gradient_checkpointing": True},
    {"channels_last": True},
    {"compile_unet": True, "compile_backend": "aot_eager"},  # the compile path (dynamo + AOT autograd)
    {"cpu_convolutions": "onednn"},
    {"cpu_convolutions": "native"},
])
def test_fast_path_options_do_not_change_results(tmp_path, tiny_dir, option):
    """Each option changes the first step by float32 rounding only, on any x86 CPU.

    Measured against a float64 run of the same U-Net, adapter and batch, on the shipped toy model: a trained
    U-Net is well conditioned, so every kernel choice's gradients are within 1e-6 of float64 (measured: 5e-7 to
    1e-6), and 1e-4 leaves a hundredfold margin while catching any real change. (The random test U-Net amplifies
    rounding a thousandfold, by an amount that depends on the CPU's kernels, so it cannot bound them.)
    Then ten steps on the test U-Net keep the same loss curve."""
    toy = {"model": str(TOY_MODEL), "resolution": 32}
    loss, grads, exact_loss, exact = first_step(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "plain"),
                                                       **toy), float64=True)
    fast_loss, fast, _, _ = first_step(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "fast"), **toy, **option))
    assert fast.shape == grads.shape
    for values, value in ((grads, loss), (fast, fast_loss)):
        assert float((values - exact).norm() / exact.norm()) < 1e-4  # all gradients together: some are ~0
        assert value == pytest.approx(exact_loss, rel=1e-5)
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "plain-run"), steps=10))
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "fast-run"), steps=10, **option))
    assert losses(tmp_path / "fast-run") == pytest.approx(losses(tmp_path / "plain-run"), rel=2e-3)


def test_samples_and_loss_curve(tmp_path, tiny_dir):
    from bwl.train import plot_loss_curve

    train(config(tmp_path, tiny_dir, steps=10, sample_every=5, sample_prompts=["sks, circle", "a photo"]))
    samples = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step-0000005.png", "step-0000010.png"]
    ax = plot_loss_curve(tmp_path / "run" / "loss.csv")
    assert len(ax.lines[0].get_xdata()) == 2


def test_optimizer_and_precision_choices_are_checked_when_configured():
    with pytest.raises(ValueError, match="optimizer='sgd' is not one of adamw, adamw8bit"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        TrainConfig(mixed_precision="fp8")
    import importlib.util

    from bwl.train.run import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="optimizer='adamw8bit' needs bitsandbytes"):
            make_optimizer([{"params": params}], TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    assert make_optimizer([{"params": params}], TrainConfig(), torch.device("cpu")).defaults["fused"]


def test_norms_in_compute_dtype_round_only_and_only_inside_the_block():
    from bwl.train.fast.autocast_norms import install, norms_in_compute_dtype

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.Conv2d(16, 16, 1), torch.nn.LayerNorm(8))
    x = torch.randn(2, 16, 8, 8)
    model.requires_grad_(False)
    reference = model(x)
    assert install(model) == 2
    assert torch.equal(model(x), reference)  # outside the block: the stock forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(x)
        with norms_in_compute_dtype():
            fast = model(x)
    assert fast.dtype == torch.bfloat16
    assert float((fast.float() - reference).norm() / reference.norm()) < 2e-2
    assert float((fast.float() - stock.float()).norm() / stock.float().norm()) < 2e-2


def test_bf16_training_with_norms_in_compute_dtype_and_checkpointing(tmp_path, tiny_dir):
    """Checkpointing recomputes the forward in backward: the norms must run there as they did in forward."""
    train(
        config(
            tmp_path,
            tiny_dir,
            output_dir=str(tmp_path / "plain"),
            steps=10,
            mixed_precision="bf16",
            norms_in_compute_dtype=False,
        )
    )
    train(
        config(
            tmp_path,
            tiny_dir,
            output_dir=str(tmp_path / "fast"),
            steps=10,
            mixed_precision="bf16",
            gradient_checkpointing=True,
        )
    )
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "plain"), rel=2e-2)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 autocast norms and CUDA graphs are CUDA paths"
)
@pytest.mark.parametrize("option", [
    {"norms_in_compute_dtype": False},
    {"compile_unet": True, "compile_mode": "reduce-overhead"},
    {"gradient_checkpointing": True},
])
def test_cuda_fast_path_options_do_not_change_the_loss_curve(tmp_path, tiny_dir, option):
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "plain"), mixed_precision="bf16"))
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "fast"), mixed_precision="bf16", **option))
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "plain"), rel=3e-2)


def test_cpu_convolutions_native_only_for_tiny_convolutions(tmp_path, tiny_dir):
    from bwl.train import TrainingRun
    from bwl.train.fast import cpu_convolutions

    tiny = TrainingRun(config(tmp_path, tiny_dir))
    latents, text, _, _ = tiny.batch(0)
    assert cpu_convolutions.mean_conv_work(tiny.unet, latents, text) < 1e6  # 8x8 latents, 32-64 channels
    assert tiny.fast.cpu_convolutions == "native"
    assert TrainingRun(config(tmp_path, tiny_dir, cpu_convolutions="onednn")).fast.cpu_convolutions == "onednn"
    toy = TrainingRun(config(tmp_path, tiny_dir, model=str(TOY_MODEL), resolution=32, batch_size=8))
    assert toy.fast.cpu_convolutions == "onednn"  # 16x16 latents, 48-96 channels: ~5-8 M multiply-accumulates a call

    before = torch.backends.mkldnn.enabled
    with tiny.kernels():
        assert torch.backends.mkldnn.enabled is False
    assert torch.backends.mkldnn.enabled == before  # only inside the step
    with pytest.raises(ValueError, match="cpu_convolutions='mkl' is not one of auto, onednn, native"):
        TrainConfig(cpu_convolutions="mkl")

    train(config(tmp_path, tiny_dir, steps=2))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cpu_convolutions"] == "native"


def test_channels_last_transformers_hand_back_their_output_without_the_nchw_copy(pipe):
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from bwl.train.fast import channels_last

    class CountClones(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.clones = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.clones += func is torch.ops.aten.clone.default
            return func(*args, **(kwargs or {}))

    unet = pipe.unet.to(memory_format=torch.channels_last).requires_grad_(False)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    timesteps, text = torch.tensor([10, 500]), torch.randn(2, 77, unet.config.cross_attention_dim)

    def forward_and_backward() -> tuple[torch.Tensor, int]:
        sample = x.clone().requires_grad_()
        with CountClones() as counter:
            out = unet(sample, timesteps, text).sample
            out.square().sum().backward()
        return out.detach(), counter.clones

    stock, stock_clones = forward_and_backward()
    assert (
        channels_last.install(unet)
        == Counter(type(m).__name__ for m in unet.modules())["ChannelsLastTransformer2DModel"]
        > 0
    )
    assert forward_and_backward()[1] == stock_clones > 0  # outside the block: diffusers' own output, copies and all
    with channels_last.keep_layout():
        kept, kept_clones = forward_and_backward()
    assert kept_clones == 0
    assert_float32_equal(kept, stock, float32_bound(unet))  # the same function in another memory layout


def test_a_failed_compilation_falls_back_to_eager_with_one_warning_and_the_run_finishes(tmp_path, tiny_dir):
    """As TorchInductor's C++ code generation fails on some CPUs: the step runs eagerly, the config records it, and
    the adapter is bit-identical to an eager run's (the failed step is redrawn from its seed)."""
    import warnings

    import torch._dynamo

    def failing_backend(graph, example_inputs):
        raise AssertionError("forced: codegen/cpp.py store")

    torch._dynamo.reset()
    torch._dynamo.register_backend(failing_backend, name="bwl_test_failing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "compiled"), steps=4, compile_unet=True,
                             compile_backend="bwl_test_failing"))
    fallbacks = [w for w in caught if "training eagerly instead" in str(w.message)]
    assert len(fallbacks) == 1 and "AssertionError: forced" in str(fallbacks[0].message)
    record = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert "AssertionError: forced" in record["compile_fallback"]
    eager = train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "eager"), steps=4))
    assert json.loads((tmp_path / "eager" / "config.json").read_text())["compile_fallback"] is None
    compiled_tensors, eager_tensors = load_file(final), load_file(eager)
    assert all(torch.equal(compiled_tensors[k], eager_tensors[k]) for k in eager_tensors)
    from bwl.train.fast.compile import compile_failure

    assert compile_failure(ValueError("a shape error in the model")) is None  # only compile failures fall back


def test_tensorboard_logging_is_opt_in_and_leaves_the_run_key_alone(tmp_path, tiny_dir, pipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bwl.study.design.runs import run_key

    contents = {"model": "m", "instance_dir": "i"}
    plain, logged = config(tmp_path, tiny_dir), config(tmp_path, tiny_dir, log_with="tensorboard")
    assert run_key(plain, contents) == run_key(logged, contents)
    train(config(tmp_path, tiny_dir, steps=10, log_every=5, log_with="tensorboard"), pipe=pipe)
    accumulator = EventAccumulator(str(tmp_path / "run" / "logs" / "run"))  # <output_dir>/logs/<run name>
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [5, 10]
    assert [e.value for e in accumulator.Scalars("loss")] == pytest.approx(losses(tmp_path / "run"))
    with pytest.raises(ConfigError, match="log_with='mlflow' is not one of tensorboard, wandb"):
        TrainConfig(log_with="mlflow")
