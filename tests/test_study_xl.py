"""The study on an SDXL-shaped U-Net: adapter keys read in the model's layout, the sweep over SDXL's seven blocks, and
the grids (the paper's LoCon groups and B-LoRA's and InstantStyle's blocks) run end to end on a tiny SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from bwl.adapters.architectures import BlockSpecError
from bwl.sd.tiny import build_tiny_sdxl_pipeline
from bwl.study.design.profile import load_profile
from bwl.study.design.vocabulary import GRIDS, AdapterKey, Concept, style
from bwl.study.experiments.sweep import sweep_specs, upper_spec
from bwl.study.running.study import Study


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


def xl_study(tmp_path, xl_dir, **overrides) -> Study:
    values = {"model": str(xl_dir), "build_tiny": False, "runs_dir": str(tmp_path / "runs"),
              "figures_dir": str(tmp_path / "figures"), "metrics": "none", "grids": ["fig4b", "xl"], "seeds": [0],
              "prompts": ["zkc, qrv, sky background"]}
    values.update(overrides)
    return Study(load_profile("smoke", values))


def test_keys_are_read_in_their_layout():
    assert style("locon", "IN1+OUT2").blocks == "middle"  # SD 1.x's middle level
    assert style("locon", "IN1+OUT2", "sdxl").blocks == "IN1+OUT2"  # on SDXL, two levels
    assert style("locon", "IN0+OUT2", "sdxl").blocks == "upper"
    assert style("lora", "OUT01+OUT00", "sdxl").blocks == "OUT00+OUT01"
    assert str(style("lora", "OUT00+OUT01", "sdxl")) == "style_lora_OUT00+OUT01"
    assert style("locon", "upper").on("sdxl") == style("locon", "upper", "sdxl")  # groups mean a level everywhere
    with pytest.raises(BlockSpecError, match=r"style_locon_OUT2: blocks 'OUT2' name sd1 blocks; make the key with "
                                             r"arch='sdxl'"):
        style("locon", "OUT2").on("sdxl")
    with pytest.raises(BlockSpecError, match="unknown block 'OUT3'; valid on SDXL"):
        AdapterKey(Concept.STYLE, "locon", "OUT3", arch="sdxl")


def test_sweep_covers_sdxl_seven_blocks_and_their_pairs():
    assert sweep_specs(arch="sdxl")[:7] == ["IN0", "IN1", "IN2", "MID", "OUT0", "OUT1", "OUT2"]
    assert len(sweep_specs(arch="sdxl")) == 7 + 21
    assert upper_spec("sdxl") == "IN0+OUT2" and upper_spec() == "IN0+OUT3"


def test_toy_xl_profile_reads_the_sdxl_model_in_its_own_folders():
    profile = load_profile("toy-xl")
    assert profile.model == "data/toy-sdxl" and "fig2" not in profile.grids and "xl" in profile.grids
    assert profile.figures.name == "toy-xl" and profile.out.name == "toy-xl"
    assert len(profile.pairs) == 3 and profile.train_seeds == [0, 1, 2]


def adapted_modules(path) -> set[str]:
    return {k.split(".lora")[0].removeprefix("unet.") for k in load_file(path) if k.startswith("unet.")}


def test_grids_and_sweep_run_on_a_tiny_sdxl(tmp_path, xl_dir):
    from bwl.study.experiments.sweep import read_sweep, run_sweep

    study = xl_study(tmp_path, xl_dir)
    assert study.architecture.name == "sdxl"
    study.prepare_data()
    files = study.train_all()
    bottom = adapted_modules(files[style("locon", "bottom")])  # SDXL's bottom: IN2 + OUT0, the lowest level
    assert bottom and all(m.startswith(("down_blocks.2.", "up_blocks.0.")) for m in bottom)
    assert any(m.startswith("up_blocks.0.resnets") for m in bottom)
    b_lora = adapted_modules(files[style("lora", "OUT00+OUT01", "sdxl")])
    assert {".".join(m.split(".")[:4]) for m in b_lora} == {"up_blocks.0.attentions.0", "up_blocks.0.attentions.1"}
    instantstyle = adapted_modules(files[style("lora", "OUT01", "sdxl")])
    assert instantstyle and all(m.startswith("up_blocks.0.attentions.1.") for m in instantstyle)
    study.run_grids()
    assert [r.cell for r in study.results() if r.grid == "xl"] == [c.label for c in GRIDS["xl"].columns()]

    sweep = xl_study(tmp_path, xl_dir, grids=["fig4b"], sweep_pairs=False, sweep_seeds=[0])
    results = read_sweep(run_sweep(sweep))
    assert [r.spec for r in results] == sweep_specs(pairs=False, arch="sdxl")


def test_an_sd1_study_refuses_sdxl_blocks_by_name(tmp_path, tiny_dir):
    study = Study(load_profile("smoke", {"model": str(tiny_dir), "build_tiny": False, "grids": ["xl"],
                                         "runs_dir": str(tmp_path / "runs"), "metrics": "none"}))
    with pytest.raises(BlockSpecError, match="id_lora_OUT00\\+OUT01: blocks 'OUT00\\+OUT01' name sdxl blocks"):
        study.adapter_files()


def test_side_by_side_says_which_verdicts_carry_over(tmp_path):
    import csv
    import subprocess
    import sys

    from bwl.study.scoring.side_by_side import write_side_by_side

    with open("figures/replicate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    uncertain = ("C2", "fig4a", "full ID + upper style", "upper ID + full style")  # the same verdict, not after Holm
    flipped = ("C2", "fig4a", "full ID + upper style", "upper ID + upper style")  # another verdict
    xl = [r for r in rows if r["grid"] != "fig2"]  # SDXL's upper group holds no attention: no LoRA grid
    for r in xl:
        if (r["group"], r["grid"], r["cell"], r["vs"]) == uncertain:
            r["row_verdict_holm"] = "tie"
        if (r["group"], r["grid"], r["cell"], r["vs"]) == flipped:
            r["row_verdict"], r["row_verdict_holm"] = "loses", "loses"
    with open(tmp_path / "xl.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(xl)
    table = write_side_by_side({"SD 1.x": Path("figures/replicate.csv"), "SDXL": tmp_path / "xl.csv"},
                               tmp_path / "architectures").read_text()
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in table.splitlines()[2:]}
    assert lines[("C2", "fig4a", "full ID + upper style vs upper ID + full style")].endswith("| before Holm |")
    assert lines[("C2", "fig4a", "full ID + upper style vs upper ID + upper style")].endswith("| no |")
    assert lines[("C3", "fig4b", "full ID + upper style vs full ID + middle style")].endswith("| yes |")
    assert lines[("C1", "fig2", "full ID + upper-trained style vs full ID + full style")].endswith(
        "| not run | not run | not run |")
    assert "Holm beats, robust" in lines[("C2", "fig4a", "full ID + upper style vs upper ID + full style")]
    with open(tmp_path / "architectures.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(lines) and {"sd1x_style_effect", "sdxl_holm", "carries_over"} <= set(written[0])
    assert (tmp_path / "architectures.png").stat().st_size > 0

    out = subprocess.run([sys.executable, "-m", "bwl", "side-by-side", "--profiles", "replicate", "replicate",
                          "--out", str(tmp_path / "same")], capture_output=True, text=True, check=True).stdout
    assert "| no |" not in out and "| yes |" in out


def test_the_gates_read_a_replicated_profiles_own_results_or_its_first_replicate(tmp_path):
    from bwl.study.experiments.gates import gates_study

    profile = load_profile("toy-xl", {"figures_dir": str(tmp_path)})
    assert gates_study(profile).figures == tmp_path / "replicate" / "zkc-qrv-s0"
    (tmp_path / "results.csv").write_text("grid,cell\n")
    assert gates_study(profile).figures == tmp_path
