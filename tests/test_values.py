"""Values from the wild: every config field coerced to its type and range-checked when the config is made, from the
command line, a YAML file or a profile alike; named failures are one line on the command line."""

import pytest
import yaml

from bwl.__main__ import main
from bwl.core.config import ConfigError
from bwl.study.design.profile import load_profile
from bwl.train import TrainConfig

from .test_data import write_images


@pytest.fixture
def cli_run(tmp_path, tiny_dir, capsys):
    """``python -m bwl train`` on the tiny model with extra flags: (exit code, stderr, whether an adapter exists)."""
    write_images(tmp_path / "images", count=2)

    def run(*flags: str) -> tuple[int, str, bool]:
        out = tmp_path / "run"
        code = main(["train", "--model", str(tiny_dir), "--instance-dir", str(tmp_path / "images"), "--resolution",
                     "64", "--steps", "2", "--batch-size", "1", "--repeats", "1", "--checkpoint-every", "0",
                     "--output-dir", str(out), *flags])
        return code, capsys.readouterr().err, (out / "adapter.safetensors").exists()

    return run


def test_a_learning_rate_written_as_1e_3_is_a_float_from_flags_yaml_and_profiles(tmp_path, cli_run):
    assert yaml.safe_load("learning_rate: 1e-3")["learning_rate"] == "1e-3"  # YAML 1.1: a string
    assert TrainConfig(learning_rate="1e-3").learning_rate == 0.001
    assert load_profile("toy", {"train": {"learning_rate": "1e-3"}}).train["learning_rate"] == "1e-3"
    code, err, written = cli_run("--learning-rate", "1e-3")
    assert (code, err, written) == (0, "", True)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--steps", "-5", "TrainConfig.steps=-5: must be an integer >= 1"),
    ("--steps", "abc", "TrainConfig.steps='abc' is not a valid int"),
    ("--resolution", "0", "TrainConfig.resolution=0: must be a positive multiple of 8"),
    ("--batch-size", "0", "TrainConfig.batch_size=0: must be an integer >= 1"),
    ("--learning-rate=-1e-4", None, "TrainConfig.learning_rate=-0.0001: must be > 0"),
    ("--model", "nowhere", "model 'nowhere': no such local directory"),
    ("--blocks", "uper", "unknown block 'uper'"),
])
def test_bad_values_are_one_line_errors_naming_the_field_and_write_nothing(cli_run, flag, value, message):
    code, err, written = cli_run(flag, *([value] if value is not None else []))
    assert code == 2 and not written
    assert err.startswith("bwl: error: ") and message in err and err.count("\n") == 1, err


def test_a_yaml_config_file_gets_the_same_results_as_flags(tmp_path, cli_run):
    (tmp_path / "good.yaml").write_text("learning_rate: 1e-3\ntext_encoder_lr: 5e-4\ntrain_text_encoder: true\n")
    assert cli_run("--config", str(tmp_path / "good.yaml")) == (0, "", True)
    (tmp_path / "bad.yaml").write_text("learning_rate: -1e-4\n")
    code, err, written = cli_run("--config", str(tmp_path / "bad.yaml"), "--output-dir", str(tmp_path / "other"))
    assert code == 2 and err.count("\n") == 1 and "TrainConfig.learning_rate=-0.0001: must be > 0" in err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("steps", -5, "steps=-5: must be an integer >= 1"),
    ("steps", "abc", "steps='abc' is not a valid int"),
    ("learning_rate", 0, "learning_rate=0.0: must be > 0"),
    ("batch_size", 0, "batch_size=0"),
])
def test_a_profile_with_a_bad_train_value_is_refused_naming_it(key, value, message):
    with pytest.raises(ConfigError, match=f"profile toy.yaml: train: TrainConfig.{message}"):
        load_profile("toy", {"train": {key: value}})


def test_profile_fields_are_coerced_and_checked():
    assert load_profile("toy", {"guidance_scale": "7", "seeds": ["1", 2]}).seeds == [1, 2]
    with pytest.raises(ConfigError, match=r"Profile.seeds=\[\]: must be a non-empty list"):
        load_profile("toy", {"seeds": []})
    with pytest.raises(ConfigError, match="Profile.resolution=30: must be a positive multiple of 8"):
        load_profile("toy", {"resolution": 30})


def test_named_failures_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "a.ckpt").write_bytes(b"pickle")
    assert main(["inspect", str(tmp_path / "a.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bwl: error: ") and err.count("\n") == 1 and "pickle" in err
    assert main(["findings", "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    with pytest.raises(Exception, match="pickle"):
        main(["--debug", "inspect", str(tmp_path / "a.ckpt")])
