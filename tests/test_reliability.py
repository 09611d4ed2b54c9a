"""Reliability: parsers never fail unexpectedly, kills lose at most one checkpoint, determinism, untrusted files."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bwl.adapters.blocks import PAPER_BLOCKS, BlockSpecError, block_weights, parse_blocks
from bwl.adapters.files import AdapterFileError, read_info, read_tensors
from bwl.adapters.report import inspect_adapter
from bwl.data.captions import compose_caption
from bwl.data.datasets import split_tags
from bwl.train import TrainConfig, train

from .conftest import render
from .test_data import write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
names = st.sampled_from(["IN0", "in1", "Mid", "OUT3", "upper", "middle", "bottom", "all", "none", "IN9", "x", "", " "])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(names).map("+".join), st.lists(names).map(",".join)))
def test_block_spec_parser_gives_blocks_or_block_spec_error(spec):
    try:
        blocks = parse_blocks(spec)
    except BlockSpecError:
        return
    assert set(blocks) <= set(PAPER_BLOCKS) and list(blocks) == sorted(blocks, key=PAPER_BLOCKS.index)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_block_weights_give_weights_or_block_spec_error(spec):
    try:
        weights = block_weights(spec)
    except BlockSpecError:
        return
    assert len(weights) == 26 and all(isinstance(v, float) for v in weights.values())


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(max_size=10), st.lists(st.text(max_size=8), max_size=4))
def test_caption_parser_round_trips(caption, trigger, blacklist):
    tags = split_tags(caption)
    assert all(t and t == t.strip() and "," not in t for t in tags)
    composed = compose_caption(tags, trigger, blacklist=blacklist)
    lowered = [t.lower() for t in split_tags(composed)]
    assert len(lowered) == len(set(lowered)) or "," in trigger or "\n" in trigger


def _config(tmp_path, tiny_dir, out, **overrides):
    values = dict(output_dir=str(out), model=str(tiny_dir), instance_dir=str(tmp_path / "images"), resolution=64,
                  steps=60, batch_size=2, repeats=2, checkpoint_every=10, log_every=10, learning_rate=1e-3)
    values.update(overrides)
    return TrainConfig(**values)


def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_dir):
    write_images(tmp_path / "images", count=3)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import torch; torch.set_num_threads(1)
        from bwl.train import TrainConfig, train
        train(TrainConfig(**{json.dumps(_config(tmp_path, tiny_dir, killed).to_dict())}))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = killed / "checkpoints" / "checkpoint-0000020.safetensors"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter.safetensors").exists(), "the run finished before it could be killed"
    resumed = train(_config(tmp_path, tiny_dir, killed, resume=True))
    straight = train(_config(tmp_path, tiny_dir, tmp_path / "straight"))
    a, b = read_tensors(resumed), read_tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_a_save_leaves_the_previous_file_intact(tmp_path):
    target, ready = tmp_path / "adapter.safetensors", tmp_path / "ready"
    target.write_bytes(b"previous complete file")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from bwl.core.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of a new file")
                f.flush()
                Path({str(ready)!r}).touch()
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"previous complete file"


def test_same_seed_same_machine_is_bit_identical(tmp_path, tiny_dir, pipe):
    write_images(tmp_path / "images", count=2)
    a = read_tensors(train(_config(tmp_path, tiny_dir, tmp_path / "a", steps=10, checkpoint_every=0, random_flip=True)))
    b = read_tensors(train(_config(tmp_path, tiny_dir, tmp_path / "b", steps=10, checkpoint_every=0, random_flip=True)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(render(pipe, seed=3), render(pipe, seed=3))


def test_metadata_is_never_executed_or_used_as_a_path(tmp_path):
    tensors = {"unet.up_blocks.3.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32, 1, 1),
               "unet.up_blocks.3.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2, 1, 1)}
    evil = {"bwl_spec": json.dumps({"method": "lora", "blocks": "all", "__import__('os').system('touch pwned')": 1}),
            "bwl_base_model": "../../etc/passwd", "lora_adapter_metadata": "{not json"}
    save_file(tensors, str(tmp_path / "evil.safetensors"), metadata=evil)
    with pytest.raises(AdapterFileError, match="metadata field 'lora_adapter_metadata' is not JSON"):
        read_info(tmp_path / "evil.safetensors")
    with pytest.raises(AdapterFileError, match="metadata field 'lora_adapter_metadata' is not JSON"):
        inspect_adapter(tmp_path / "evil.safetensors")
    del evil["lora_adapter_metadata"]
    save_file(tensors, str(tmp_path / "evil.safetensors"), metadata=evil)
    with pytest.raises(AdapterFileError, match="metadata field 'bwl_spec' is not an adapter spec .*unexpected keyword"):
        read_info(tmp_path / "evil.safetensors")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_a_kill_during_a_grid_leaves_completed_cells_reusable(tmp_path, monkeypatch):
    from .test_study import smoke

    study = smoke(tmp_path)
    study.prepare_data()
    study.train_all()
    from bwl.study.running import cells

    real = cells.generate
    calls = []

    def dies_on_third_cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-grid")
        return real(*args, **kwargs)

    monkeypatch.setattr(cells, "generate", dies_on_third_cell)
    with pytest.raises(KeyboardInterrupt):
        study.run_grids()
    monkeypatch.setattr(cells, "generate", real)
    log = []
    smoke(tmp_path).run_grids(log=log.append)
    assert log == ["fig4b: 6 cells, 4 generated (2 images each), 2 reused"]


# ----- the command line: quiet, fast to fail, one line for any failure ---------------------------------------------

FULL_DISK_HOOK = '''
import errno, os
_full_at = os.environ["BWL_TEST_FULL_AT"]
_replace = os.replace


def replace(src, dst, *args, **kwargs):  # every atomic write of bwl ends here: the disk is full for this file
    if str(dst).endswith(_full_at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
'''


def bwl_command(*args: str, env: dict | None = None, limit_bytes: int | None = None, timeout: int = 900):
    """``python -m bwl …`` in a subprocess (its own kernels and workers inherit ``env``); ``limit_bytes``: the
    largest file any of them may write (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a larger write fails with EFBIG)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "bwl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})},
                          preexec_fn=limit if limit_bytes else None)


def test_a_missing_model_fails_first_in_one_line_without_warnings(tmp_path):
    from .test_data import write_images

    write_images(tmp_path / "photos", count=5)
    for caption in (tmp_path / "photos").glob("*.txt"):
        caption.unlink()
    done = bwl_command("train", "--model", "nowhere", "--instance-dir", str(tmp_path / "photos"),
                       "--output-dir", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) <= 3, lines
    assert lines[-1].startswith("bwl: error: model 'nowhere'") and not any("Hub" in line for line in lines)


def test_missing_captions_are_one_warning_line_for_the_folder(tmp_path, tiny_dir):
    from .test_data import write_images

    write_images(tmp_path / "photos", count=5)
    for caption in (tmp_path / "photos").glob("*.txt"):
        caption.unlink()
    done = bwl_command("train", "--model", str(tiny_dir), "--instance-dir", str(tmp_path / "photos"), "--output-dir",
                       str(tmp_path / "out"), "--steps", "1", "--resolution", "64", "--batch-size", "1")
    warnings = [line for line in done.stderr.splitlines() if "caption" in line]
    assert done.returncode == 0, done.stderr
    assert warnings == [f"bwl: warning: {tmp_path / 'photos'}: 5 image(s) have no caption file (00.png, 01.png, "
                        "02.png, …); using 'sks'"]


SMOKE_FIG4B = ("--profile", "smoke", "--set", "grids=[fig4b]", "--set", "build_tiny=false")


def in_folder(tmp_path, model) -> list[str]:
    """A run of the saved tiny model whose every output goes under ``tmp_path``."""
    return ["--set", f"model={model}", "--set", f"runs_dir={tmp_path / 'runs'}", "--set",
            f"figures_dir={tmp_path / 'figures'}"]


@pytest.mark.parametrize("stage, fault", [
    ("data", ("BWL_TEST_FULL_AT", ".txt")),  # a caption file, in notebook 01
    ("adapters", ("BWL_TEST_FULL_AT", "adapter.safetensors")),  # in notebook 02, in its training process
    ("cells", ("BWL_TEST_FULL_AT", "scores.json")),  # the cell's last file, in notebook 03
    ("figures", ("BWL_TEST_FULL_AT", "fig4b.png")),  # in notebook 04
    ("executed notebook", ("limit", 60_000)),  # papermill's own write of notebook 01 (no file may pass 60 kB)
])
def test_a_full_disk_at_any_stage_of_a_run_is_one_line_and_status_2(tmp_path, tiny_dir, stage, fault):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(FULL_DISK_HOOK)
    key, value = fault
    env = {"PYTHONPATH": str(tmp_path / "hook"), key: value} if key != "limit" else {}
    done = bwl_command("run", *SMOKE_FIG4B, *in_folder(tmp_path, tiny_dir), env=env,
                       limit_bytes=value if key == "limit" else None)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("bwl: error:"), errors
    reason = "No space left on device" if key != "limit" else "File too large"
    assert reason in errors[0] and str(tmp_path / "runs") in errors[0], errors[0]


def test_two_runs_sharing_a_folder_train_each_adapter_once(tmp_path, tiny_dir):
    from bwl.study.design.vocabulary import GRIDS, adapters_of

    args = [sys.executable, "-m", "bwl", "run", *SMOKE_FIG4B, *in_folder(tmp_path, tiny_dir)]
    runs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    trained = [line for log in logs for line in log.splitlines() if ": trained " in line]
    files = (tmp_path / "runs" / "adapters").glob("*/adapter.safetensors")
    adapters = sorted(f.parent.name.rsplit("-", 1)[0] for f in files)
    assert len(adapters) == len(adapters_of([GRIDS["fig4b"]]))
    assert sorted(line.split("] ")[1].split(":")[0] for line in trained) == adapters, logs  # each trained once
    cells = list((tmp_path / "runs" / "cells").glob("*/scores.json"))
    generated = sum(int(n) for log in logs for n in re.findall(r"fig4b: \d+ cells, (\d+) generated", log))
    assert generated == len(cells), logs  # every cell generated once, by one run or the other


def test_a_killed_runs_training_workers_end_with_it(tmp_path):
    """Killing a run mid-training leaves no worker process behind, still training for nobody (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's (prctl)")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from bwl.study.running.workers import _start_worker

        def work(path):
            open(path, "w").write(str(os.getpid()))
            time.sleep(600)

        if __name__ == "__main__":
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=(1,)) as pool:
                pool.submit(work, {str(tmp_path / "pid")!r}).result()
    """))
    run = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.time() < deadline and run.poll() is None, "the worker never started"
        time.sleep(0.2)
    worker = int((tmp_path / "pid").read_text())
    run.send_signal(signal.SIGKILL)
    run.wait()

    def alive(pid: int) -> bool:
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 20
    while alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(worker), f"worker {worker} outlived its killed run"
