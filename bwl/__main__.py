"""Command line: ``python -m bwl <command>``: run, train, inspect, analyze, zip, export-kohya, import-kohya, sweep,
methods, lengths, replicate, combine, findings, eye-check, validate-reference, gates, assets, block-maps, mechanism,
side-by-side, pretrain, probes, toy-clip, demo.

A failure bwl can name (a bad config value, block spec, adapter file, dataset, model, a failed notebook, or an
operating-system error such as a full disk, with its path) is one line on stderr, ``bwl: error: <message>``, and exit
status 2; ``--debug`` shows its traceback. Unexpected exceptions still show theirs. A warning is one line too,
``bwl: warning: <message>``, without Python's echo of the source line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from bwl.adapters.architectures import block_maps_markdown
from bwl.adapters.blocks import BlockSpecError
from bwl.adapters.files import AdapterFileError
from bwl.adapters.kohya import export_kohya, import_kohya
from bwl.adapters.report import inspect_adapter
from bwl.core import config as configs
from bwl.core.atomic import write_text
from bwl.core.config import ConfigError
from bwl.data.datasets import DatasetError
from bwl.data.tagging import TaggerError
from bwl.sd.encoders import DEFAULT_CLIP, DEFAULT_DINO
from bwl.sd.pipeline import load_pipeline
from bwl.study.design.profile import load_profile
from bwl.study.design.vocabulary import Concept
from bwl.study.experiments.analyzer import analyze_file, reference_scorer
from bwl.study.experiments.combine import run_combine
from bwl.study.experiments.eyecheck import evaluate as evaluate_eye_check
from bwl.study.experiments.eyecheck import write_sample
from bwl.study.experiments.gates import gates as measure_gates
from bwl.study.experiments.gates import gates_markdown
from bwl.study.experiments.lengths import run_lengths
from bwl.study.experiments.mechanism import run_mechanism_study
from bwl.study.experiments.methods import run_methods
from bwl.study.experiments.replicate import run_replicate
from bwl.study.experiments.validation import write_validation
from bwl.study.presentation.demo import run_demo
from bwl.study.presentation.figures import block_sweep
from bwl.study.running.runner import StudyFailed, run_study
from bwl.study.running.study import Study
from bwl.study.scoring.findings import findings_report
from bwl.study.scoring.side_by_side import write_side_by_side
from bwl.toy.assets import train_and_save_probes
from bwl.toy.encoder import train_toy_clip
from bwl.toy.pretrain import PretrainConfig, pretrain
from bwl.toy.records import assets_markdown
from bwl.train import TrainConfig, TrainingDiverged, train
from bwl.train.ziplora import ZipConfig, zip_loras

NAMED_FAILURES = (ConfigError, BlockSpecError, AdapterFileError, DatasetError, TaggerError, StudyFailed,
                  TrainingDiverged, OSError)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bwl",
                                     description="Block-wise LoRA for Stable Diffusion (1.x, 2.x, XL)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure bwl can name")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a block-wise adapter on the tiny model and write figures/demo.png")
    demo.add_argument("--out", default="figures/demo.png")
    demo.add_argument("--steps", type=int, default=60)

    run = commands.add_parser("run", help="run the study's notebooks with papermill for a profile")
    run.add_argument("--profile", default="toy", help="smoke, toy, paper, or a path to a profile YAML")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile key (value parsed as YAML), e.g. --set seeds=[0,1]")

    train_command = commands.add_parser("train", help="train one block-wise adapter")
    train_command.add_argument("--config", help="YAML or JSON file with TrainConfig keys; flags override it")
    configs.add_arguments(train_command, TrainConfig)

    pretrain_command = commands.add_parser(
        "pretrain", help="pretrain the toy world's micro SD (resumable) into data/toy-sd"
    )
    pretrain_command.add_argument("--config", help="YAML or JSON file with PretrainConfig keys")
    configs.add_arguments(pretrain_command, PretrainConfig)

    probes = commands.add_parser("probes", help="train the toy world's probes (the instruments) into data/")
    probes.add_argument("--steps", type=int, default=1200)
    probes.add_argument("--pool", type=int, default=40960, help="renders in the shared training pool")
    probes.add_argument("--only", nargs="*", default=[], help="instrument names to train (default: all)")

    for name, text in (
        ("sweep", "block sweep: style LoCon on every block and block pair (what notebook 06 runs)"),
        ("methods", "methods study: LoRA, LoCon, LoHa, LoKr, DoRA, OFT, each block-wise, C1-C3 per method"),
        ("lengths", "training-length study: full and upper-trained style at several lengths and seeds"),
        ("replicate", "replicated study: all four grids per identity-style pair and training seed, pooled"),
        ("combine", "combination study: block-wise LoRA against ZipLoRA, K-LoRA, joint training, LoRA "
                    "Switch/Composite and the tuned merge, replicated"),
    ):
        study_command = commands.add_parser(name, help=text)
        study_command.add_argument("--profile", default=name)
        study_command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    eye = commands.add_parser(
        "eye-check", help="each style instrument's accuracy on the eye-labelled sheet (figures/eye-check)"
    )
    eye.add_argument("--sample", action="store_true",
                     help="draw a new sheet from the toy study's cells (its labels then need filling in by eye)")
    eye.add_argument("--out", default="figures/eye-check")

    validate = commands.add_parser(
        "validate-reference", help="rank correlation of each reference metric with its probe counterpart, all cells"
    )
    validate.add_argument("--profile", default="toy")
    commands.add_parser("assets", help="the shipped assets' records as one table (figures/assets.md)")
    mechanism = commands.add_parser("mechanism", help="where each block represents and controls each toy attribute")
    mechanism.add_argument("--profile", default="toy")
    mechanism.add_argument("--parts", nargs="+", choices=["maps", "adapters"], default=["maps", "adapters"],
                           help="maps: decoding and patching on the base model; adapters: update sizes and adapter "
                                "patching over the profile's mechanism_adapters replicates")
    commands.add_parser("block-maps", help="every U-Net layout's block map as tables (figures/block-maps.md)")
    sides = commands.add_parser("side-by-side", help="two profiles' replicated verdicts next to each other (the toy "
                                                     "world's two architectures: figures/architectures.md/.csv/.png)")
    sides.add_argument("--profiles", nargs=2, default=["replicate", "toy-xl"], metavar="PROFILE")
    sides.add_argument("--labels", nargs=2, default=["SD 1.x toy", "SDXL toy"], metavar="LABEL")
    sides.add_argument("--out", default="figures/architectures")
    toy_clip = commands.add_parser("toy-clip", help="retrain the toy CLIP (data/toy-clip) on the seen concepts")
    toy_clip.add_argument("--steps", type=int, default=600)
    gates = commands.add_parser("gates", help="measure the toy world's quality gates (after the toy study ran)")
    gates.add_argument("--profile", default="toy")
    gates.add_argument("--count", type=int, default=64)

    findings = commands.add_parser("findings", help="the paper's claims C1-C3 decided from a study's results table")
    findings.add_argument("--profile", default="toy")

    inspect = commands.add_parser("inspect", help="method, blocks, ranks and parameters of an adapter file")
    inspect.add_argument("path")

    analyze = commands.add_parser("analyze", help="what each block of any adapter file does: one block off at a time")
    analyze.add_argument("path")
    analyze.add_argument("--model", required=True, help="base model id or directory (SD 1.x/2.x or SDXL)")
    analyze.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    analyze.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt (0..N-1)")
    analyze.add_argument("--steps", type=int, default=25)
    analyze.add_argument("--out", default="block-effects", help="folder for block_effects.png/.md/.csv")
    analyze.add_argument("--references", help="the adapter's training images: adds the reference metrics")
    analyze.add_argument("--trigger", help="with --references: the adapter's trigger word in the prompts")
    analyze.add_argument("--plain", default="", help="with --references: plain words for the trigger")
    analyze.add_argument("--clip-model", default=DEFAULT_CLIP)
    analyze.add_argument("--dino-model", default=DEFAULT_DINO)

    zipped = commands.add_parser("zip", help="merge an identity and a style LoRA/LoCon with ZipLoRA into one file")
    zipped.add_argument("identity")
    zipped.add_argument("style")
    zipped.add_argument("out")
    zipped.add_argument("--model", required=True, help="the base model both were trained on (id or directory)")
    zipped.add_argument("--identity-prompt", action="append", default=[], help="default: the file's trigger")
    zipped.add_argument("--style-prompt", action="append", default=[], help="default: the file's trigger")
    zipped.add_argument("--identity-images", help="the identity's training images (default: its own samples)")
    zipped.add_argument("--style-images", help="the style's training images (default: its own samples)")
    zipped.add_argument("--steps", type=int, default=ZipConfig.steps)
    zipped.add_argument("--lr", type=float, default=ZipConfig.learning_rate)
    zipped.add_argument("--lambda", dest="similarity_lambda", type=float, default=ZipConfig.similarity_lambda)

    export = commands.add_parser("export-kohya", help="convert a bwl adapter to kohya/A1111 format")
    export.add_argument("path")
    export.add_argument("out")

    imp = commands.add_parser(
        "import-kohya",
        help="convert a kohya/LyCORIS SD 1.x/2.x or SDXL file (U-Net and text encoders) to a bwl adapter"
    )
    imp.add_argument("path")
    imp.add_argument("out")
    imp.add_argument("--model", required=True, help="base model id or directory (module names and shapes are checked)")
    imp.add_argument("--drop-unplaced", action="store_true",
                     help="leave out U-Net modules outside the paper blocks (conv_in, time_embedding); "
                     "without it they are refused")
    return parser


def run_command(args: argparse.Namespace, cli: argparse.ArgumentParser) -> None:
    if args.command == "inspect":
        print(inspect_adapter(args.path).table())
    elif args.command == "analyze":
        print(_analyze(args).read_text())
    elif args.command == "zip":
        config = ZipConfig(args.identity, args.style, args.out, args.identity_prompt, args.style_prompt,
                           args.identity_images, args.style_images, args.steps, args.lr, args.similarity_lambda)
        out, losses = zip_loras(load_pipeline(args.model), config)
        print(f"{out} (loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps)" if losses else out)
    elif args.command == "export-kohya":
        print(export_kohya(args.path, args.out))
    elif args.command == "import-kohya":
        print(import_kohya(args.path, load_pipeline(args.model), args.out, drop_unplaced=args.drop_unplaced))
    elif args.command == "train":
        print(train(configs.from_args(TrainConfig, args)))
    elif args.command == "pretrain":
        print(pretrain(configs.from_args(PretrainConfig, args)))
    elif args.command == "probes":
        print(json.dumps(train_and_save_probes(args.steps, args.pool, only=tuple(args.only)), indent=2))
    elif args.command == "sweep":
        print(block_sweep(Study(load_profile(args.profile, _overrides(cli, args.overrides))))[1])
    elif args.command == "methods":
        study = Study(load_profile(args.profile, _overrides(cli, args.overrides)))
        if not study.concept_dir(Concept.STYLE).is_dir():
            study.prepare_data()
        print(run_methods(study))
    elif args.command == "lengths":
        print(run_lengths(load_profile(args.profile, _overrides(cli, args.overrides))))
    elif args.command == "replicate":
        print(run_replicate(load_profile(args.profile, _overrides(cli, args.overrides))))
    elif args.command == "combine":
        print(run_combine(load_profile(args.profile, _overrides(cli, args.overrides))).read_text())
    elif args.command == "eye-check":
        out = Path(args.out)
        if args.sample:
            print(write_sample(Study(load_profile("toy")).cells, out))
        else:
            print(evaluate_eye_check(out))
    elif args.command == "validate-reference":
        profile = load_profile(args.profile)
        print(write_validation(Study(profile).cells, profile.figures / "reference-validation.md",
                               f"python -m bwl validate-reference --profile {args.profile}"))
    elif args.command == "mechanism":
        out = run_mechanism_study(load_profile(args.profile), args.parts)
        for table in ("decoding.md", "patching.md", "adapter-sizes.md", "adapter-patching.md"):
            if (out / table).exists():
                print((out / table).read_text())
    elif args.command == "side-by-side":
        csvs = {label: load_profile(name).figures / "replicate.csv" for label, name in zip(args.labels, args.profiles)}
        print(write_side_by_side(csvs, Path(args.out)).read_text())
    elif args.command == "block-maps":
        print(write_text(Path("figures") / "block-maps.md", block_maps_markdown()).read_text())
    elif args.command == "assets":
        print(write_text(Path("figures") / "assets.md", assets_markdown()).read_text())
    elif args.command == "toy-clip":
        print(json.dumps(train_toy_clip(steps=args.steps), indent=2))
    elif args.command == "gates":
        measured = measure_gates(args.profile, args.count)
        profile = load_profile(args.profile)
        command = "python -m bwl gates" + (f" --profile {args.profile}" if args.profile != "toy" else "")
        print(write_text(profile.figures / "gates.md", gates_markdown(measured, command)).read_text())
    elif args.command == "findings":
        print(findings_report(Study(load_profile(args.profile)).results()))
    elif args.command == "run":
        run_study(args.profile, _overrides(cli, args.overrides))
    elif args.command == "demo":
        print(run_demo(args.out, steps=args.steps))


def _analyze(args: argparse.Namespace) -> Path:
    score = None
    if args.references:
        if not args.trigger:
            raise ConfigError("--references needs --trigger: the word in the prompts that calls the adapter")
        score = reference_scorer(args.references, args.trigger, args.plain, args.clip_model, args.dino_model)
    return analyze_file(args.path, args.model, args.prompt, list(range(args.seeds)), args.out, args.steps,
                        score=score, record={"references": args.references, "trigger": args.trigger})


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: ``bwl: warning: <message>``, no source line."""
    print(f"bwl: warning: {message}", file=sys.stderr if file is None else file)


def describe(error: BaseException) -> str:
    """A named failure in one line; an operating-system error as its reason and path (``[Errno 28]`` dropped)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = one_line_warning
    try:
        run_command(args, cli)
    except NAMED_FAILURES as error:
        if args.debug:
            raise
        print(f"bwl: error: {describe(error)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
    return 0


def _overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = configs.parse_value(value)
    return overrides


if __name__ == "__main__":
    sys.exit(main())
