"""The study path: profiles, reuse by config hash, the paper profile through a saved tiny pipeline, the runner."""

import json
import shutil

import pytest

from bwl.core.config import ConfigError
from bwl.study import GRIDS, Study, load_profile
from bwl.study.design.vocabulary import Concept, identity, style
from bwl.study.presentation.figures import make_figures


def smoke(tmp_path, **overrides):
    values = {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"), "metrics": "none",
              "grids": ["fig4b"], "seeds": [0]}
    values.update(overrides)
    return Study(load_profile("smoke", values))


def test_profiles_load_and_refuse_unknown_keys():
    for name in ("smoke", "toy", "paper", "sweep", "methods", "lengths", "replicate", "combine", "toy-xl", "paper-xl"):
        assert load_profile(name).name == name
    sweep, toy = load_profile("sweep"), load_profile("toy")
    assert sweep.out == toy.out and (sweep.model, sweep.train, sweep.prompts) == (toy.model, toy.train, toy.prompts)
    with pytest.raises(ConfigError, match="'sedes'.*valid:"):
        load_profile("toy", {"sedes": [1]})
    with pytest.raises(ConfigError, match="'stepz'"):
        load_profile("toy", {"train": {"stepz": 3}})
    valid = "valid: combine, lengths, methods, paper, paper-xl, replicate, smoke, sweep, toy"
    with pytest.raises(ConfigError, match=valid):
        load_profile("toyy")
    with pytest.raises(ConfigError, match="fig9"):
        load_profile("toy", {"grids": ["fig9"]})


def test_unknown_raw_papermill_parameter_is_refused_naming_it(tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from bwl.study.design.profile import ROOT

    with pytest.raises(
        PapermillExecutionError, match=r"unknown notebook parameter\(s\) 'seedz'; valid: profile, overrides"
    ):
        papermill.execute_notebook(str(ROOT / "notebooks" / "04_figures.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"profile": "smoke", "seedz": [0, 1], "interactive": False},
                                   kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)


def test_block_sweep_notebook_runs_under_papermill_on_the_smoke_profile(tmp_path):
    import papermill

    from bwl.study.design.profile import ROOT
    from bwl.study.experiments.sweep import read_sweep

    overrides = {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"), "sweep_pairs": False,
                 "sweep_seeds": [0]}
    out = papermill.execute_notebook(str(ROOT / "notebooks" / "06_block_sweep.ipynb"), str(tmp_path / "06.ipynb"),
                                     parameters={"profile": "smoke", "overrides": overrides, "interactive": False},
                                     kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    results = read_sweep(tmp_path / "figures" / "sweep.csv")
    assert [r.spec for r in results] == ["IN0", "IN1", "IN2", "IN3", "MID", "OUT0", "OUT1", "OUT2", "OUT3"]
    assert (tmp_path / "figures" / "sweep.png").stat().st_size > 10_000
    outputs = [o for c in out.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("| rank | style trained on |" in o.get("data", {}).get("text/markdown", "") for o in outputs)


def test_notebook_setup_passes_declared_parameters_and_rechecks_nothing(tmp_path):
    from bwl.study.running.notebook import setup

    namespace = {"sys": object(), "profile": "smoke", "overrides": {}, "interactive": False, "_i3": "cell text"}
    study = setup("smoke", {"runs_dir": str(tmp_path)}, namespace)
    assert study.profile.name == "smoke"
    namespace["files"] = {}  # the notebook's own variables, when its setup cell is re-run in JupyterLab
    setup("smoke", {"runs_dir": str(tmp_path)}, namespace)
    with pytest.raises(ConfigError, match=r"unknown notebook parameter\(s\) 'seedz'"):
        setup("smoke", {}, {"profile": "smoke", "seedz": [0, 1]})


def test_a_profile_may_not_set_what_each_grid_adapter_owns():
    for key, value in (("method", "locon"), ("blocks", "upper"), ("trigger", "sks"), ("instance_dir", "x")):
        with pytest.raises(ConfigError, match=f"train: '{key}' is set by each grid adapter"):
            load_profile("toy", {"train": {key: value}})


def test_run_key_hashes_the_resolved_config_defaults_included(tmp_path, monkeypatch):
    import dataclasses

    from bwl.study.design import runs
    from bwl.train import TrainConfig

    study = smoke(tmp_path)
    study.prepare_data()
    before = study.train_config(style("locon", "upper")).output_dir
    quieter = smoke(tmp_path, train={**study.profile.train, "log_every": 1, "checkpoint_every": 3})
    assert quieter.train_config(style("locon", "upper")).output_dir == before  # logging changes no result

    @dataclasses.dataclass
    class NewDefault(TrainConfig):  # bwl's default learning rate changes; the profile does not set it
        adam_epsilon: float = 1e-6

    monkeypatch.setattr(runs, "TrainConfig", NewDefault)
    assert smoke(tmp_path).train_config(style("locon", "upper")).output_dir != before


def test_grid_vocabulary_is_typed_and_defined_once():
    from bwl.study.design.vocabulary import AdapterKey
    from bwl.study.scoring.findings import CLAIMS

    key = AdapterKey(Concept.STYLE, "locon", "IN0+OUT3")
    assert key == style("locon", "upper") and str(key) == "style_locon_upper"
    assert str(AdapterKey("identity", "lora", "all", seed=2, concept_id="b")) == "id_lora_all_b_s2"
    for claim in CLAIMS:  # every compared cell is a column of its grid
        for grid, *labels in claim.pairs:
            for label in labels:
                GRIDS[grid].column(label)
    with pytest.raises(ValueError, match="unknown method 'vera'"):
        AdapterKey(Concept.STYLE, "vera")
    assert str(style("locon-dora", "upper")) == "style_locon-dora_upper" and style("locon-dora").dora
    with pytest.raises(ValueError, match="dora is supported on lora and locon"):
        AdapterKey(Concept.STYLE, "oft", dora=True)


def test_paper_profile_defaults_are_the_papers():
    p = load_profile("paper")
    assert p.model == "CompVis/stable-diffusion-v1-4" and p.resolution == 512
    assert p.train["steps"] == 11000 and p.train["batch_size"] == 2 and p.train["repeats"] == 25
    assert p.reg_count == 500 and p.sample_steps == 25 and p.guidance_scale == 7.0
    assert p.train["mixed_precision"] == "fp16" and p.train["gradient_checkpointing"]
    assert p.metrics == "reference" and p.clip_model == "openai/clip-vit-large-patch14"


def test_grids_share_runs_and_a_rerun_trains_nothing(tmp_path):
    study = smoke(tmp_path)
    study.prepare_data()
    assert {str(k) for k in study.needed_adapters()} == {
        "id_locon_all", "style_locon_all", "style_locon_upper", "style_locon_middle", "style_locon_bottom"}
    logs = []
    study.train_all(log=logs.append)
    assert sum(": trained locon" in line for line in logs) == 5
    study.run_grids(log=logs.append)
    again = []
    smoke(tmp_path).train_all(log=again.append)
    assert again == ["adapters: 5 of 5 reused (same config and data), 0 to train"]
    cells = []
    smoke(tmp_path).run_grids(log=cells.append)
    assert cells == ["fig4b: 6 cells, 0 generated (2 images each), 6 reused"]
    assert (tmp_path / "figures" / "results.csv").exists() and (tmp_path / "figures" / "results.md").exists()
    assert [p.name for p in make_figures(smoke(tmp_path))] == ["fig4b.png"]


def test_changed_captions_mean_a_new_run(tmp_path):
    study = smoke(tmp_path)
    study.prepare_data()
    before = study.train_config(style("locon", "upper")).output_dir
    caption = next(study.concept_dir("style").glob("*.txt"))
    caption.write_text(caption.read_text().strip() + ", hand edited\n")
    assert smoke(tmp_path).train_config(style("locon", "upper")).output_dir != before
    assert (
        study.train_config(identity("locon")).output_dir == smoke(tmp_path).train_config(identity("locon")).output_dir
    )


def test_retrained_base_model_under_the_same_path_means_new_runs_and_cells(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    from bwl.study.design.vocabulary import cell
    from bwl.study.running.cells import CellRenderer

    def keys(study):
        one = cell("ID alone", (identity("locon"), 1.0))
        renderer = CellRenderer(
            None, study.profile, study.cells, study.model_fingerprint, {}, {identity("locon"): "a"}, None
        )
        return study.train_config(identity("locon")).output_dir, renderer.key(one, ["p"], [0])

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    study = smoke(tmp_path, model=str(model), build_tiny=False)
    study.prepare_data()
    before = keys(study)
    weights = next((model / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights)
    retrained = smoke(tmp_path, model=str(model), build_tiny=False)
    after = keys(retrained)
    assert after[0] != before[0] and after[1] != before[1]


def test_paper_profile_runs_one_cell_through_from_pretrained(tmp_path, tiny_dir, dreambooth):
    photos, paintings = tmp_path / "photos" / "identity", tmp_path / "photos" / "style"
    shutil.copytree(dreambooth / "dog", photos)
    shutil.copytree(dreambooth / "red_cartoon", paintings)
    study = Study(load_profile("paper", {
        "model": str(tiny_dir), "identity_dir": str(photos), "style_dir": str(paintings), "tagger": "none",
        "resolution": 64, "reg_count": 2, "reg_prompt": "dog", "class_word": "dog", "metrics": "none",
        "train": {"steps": 2, "batch_size": 1, "repeats": 1, "checkpoint_every": 0},
        "grids": ["fig4b"], "seeds": [0], "prompts": ["sks dog, zxq style"], "sample_steps": 2,
        "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"),
    }))
    study.prepare_data()
    assert (study.out / "data" / "identity" / "00.txt").read_text().strip() == "sks, dog"
    assert len(list((study.out / "data" / "reg").glob("*.png"))) == 2
    study.train_all()
    config = json.loads((study.adapter_files()[identity("locon")].parent / "config.json").read_text())
    assert config["train"]["model"] == str(tiny_dir) and config["train"]["reg_dir"].endswith("reg")
    study.run_grids()
    assert [r.cell for r in study.results()] == [c.label for c in GRIDS["fig4b"].columns()]


def test_runner_names_the_failing_notebook_and_cell(tmp_path, monkeypatch):
    import bwl.study.running.runner as run_module
    from bwl.study.running.runner import StudyFailed, run_study

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    import nbformat

    book = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'smoke'\noverrides = {}\ninteractive = True")
    params.metadata["tags"] = ["parameters"]
    book.cells = [
        params,
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('broken on purpose')"),
    ]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, notebooks / "99_broken.ipynb")
    monkeypatch.setattr(run_module, "ROOT", tmp_path)
    with pytest.raises(StudyFailed, match=r"99_broken.ipynb failed in cell \d+ \(ValueError: broken on purpose\)"):
        run_study("smoke", {"runs_dir": str(tmp_path / "runs")}, notebooks=("99_broken.ipynb",))
    assert (tmp_path / "runs" / "notebooks" / "99_broken.ipynb").exists()


def test_block_sweep_covers_every_block_and_draws_heatmaps(tmp_path):
    from bwl.study.experiments.sweep import read_sweep, run_sweep, sweep_specs
    from bwl.study.presentation.figures import sweep_figure

    assert len(sweep_specs()) == 9 + 36 and "IN0+OUT3" in sweep_specs()
    study = smoke(tmp_path, sweep_pairs=False, sweep_seeds=[0])
    study.prepare_data()
    results = read_sweep(run_sweep(study))
    assert [r.spec for r in results] == sweep_specs(pairs=False)
    sweep_figure(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_findings_decide_claims_by_non_overlapping_intervals():
    from bwl.study.design.vocabulary import METRICS, Metric
    from bwl.study.scoring.findings import claim_verdict, compare, findings_markdown
    from bwl.study.scoring.metrics import Estimate
    from bwl.study.scoring.results import CellResult

    def row(grid, cell, identity, style, ci=0.05):
        values = {Metric.IDENTITY: identity, Metric.STYLE: style}
        return CellResult(grid, cell, "k", {m: Estimate(values.get(m, 0.5), ci, 40) for m in METRICS})

    rows = [row("fig4a", "full ID + upper style", 0.8, 0.7), row("fig4a", "upper ID + full style", 0.5, 0.7),
            row("fig4a", "upper ID + upper style", 0.95, 0.2)]
    beats = compare(rows, "fig4a", "full ID + upper style", "upper ID + full style")
    assert beats.verdict == "beats" and beats.better == [Metric.IDENTITY] and beats.worse == []
    trade = compare(rows, "fig4a", "full ID + upper style", "upper ID + upper style")
    assert trade.verdict == "trade-off" and trade.worse == [Metric.IDENTITY] and trade.better == [Metric.STYLE]
    assert claim_verdict([beats]) == "holds" and claim_verdict([beats, trade]) == "partly"
    assert compare(rows, "fig4a", "upper ID + full style", "full ID + upper style").verdict == "loses"
    with pytest.raises(KeyError, match="fig2"):
        findings_markdown(rows)


def test_adapters_trained_in_worker_processes_equal_ones_trained_here(tmp_path):
    import torch
    from safetensors.torch import load_file

    from bwl.study.running.workers import train_one

    study = smoke(tmp_path, train_workers=2)
    study.prepare_data()
    logs = []
    files = study.train_all(log=logs.append)
    assert sum(": trained" in line for line in logs) == 5 and all(f.exists() for f in files.values())
    upper = style("locon", "upper")
    steps = study.train_config(upper).steps
    assert f"step {steps}/{steps} loss" in (files[upper].parent / "train.log").read_text()  # step lines: in its log
    assert not any("step " in line for line in logs)  # the console gets one line per adapter
    config = study.train_config(upper)
    config.output_dir = str(tmp_path / "here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count: same threads, same sums, same bits
    try:
        here = load_file(train_one(config))
    finally:
        torch.set_num_threads(threads)
    there = load_file(files[upper])
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)


def test_a_run_with_some_grids_decides_the_claims_they_hold_and_names_the_rest():
    from pathlib import Path

    from bwl.study.scoring.findings import findings_by_family, findings_report
    from bwl.study.scoring.results import read_results

    results = read_results(Path(__file__).resolve().parent.parent / "figures")  # the toy study's committed table
    only_fig4b = findings_by_family([r for r in results if r.grid == "fig4b"])
    assert "**C3: style trained on upper > middle > bottom:" in only_fig4b and "**C1" not in only_fig4b
    assert only_fig4b.endswith("Not decided by this run: C1 (needs fig2 and fig3 scored), C2 (needs fig4a scored).\n")
    assert "Not decided" not in findings_by_family(results)
    assert findings_report([]).startswith("No findings for this run: C1 needs fig2 and fig3")


def test_a_single_image_cell_shows_n_1_not_nan():
    from bwl.study.scoring.metrics import mean_ci

    assert str(mean_ci([0.5])) == "0.50 (n = 1)"
    assert str(mean_ci([0.5, 0.7])).startswith("0.60 ± ")


def test_a_cell_drops_its_adapters_without_peft_warning_about_the_resident_ones(tmp_path):
    import warnings

    from bwl.study.design.vocabulary import BLOCKWISE_INFERENCE, cell

    study = smoke(tmp_path)
    study.prepare_data()
    keys = [identity("locon"), style("locon")]
    study.train_all(keys)
    renderer = study.renderer(keys, resident=[style("locon")])
    blockwise = cell(BLOCKWISE_INFERENCE, (identity("locon"), 1.0), (style("locon"), "upper"))
    with warnings.catch_warnings():  # the identity is the only active adapter outside upper when it is dropped
        warnings.filterwarnings("error", message="Adapter .* was active")
        key, generated = renderer.render(blockwise, ["zkc, qrv, sky background"], [0])
    assert generated and [str(style("locon"))] == sorted({n for names in renderer.pipe.get_list_adapters().values()
                                                           for n in names})
