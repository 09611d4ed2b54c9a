"""Command line: ``python -m bwl {demo,train,inspect,export-kohya,import-kohya} ...``."""

from __future__ import annotations

import argparse
import json
import sys

from . import config as configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bwl", description="Block-wise LoRA for Stable Diffusion 1.x")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a block-wise adapter on the tiny model and write figures/demo.png")
    demo.add_argument("--out", default="figures/demo.png")
    demo.add_argument("--steps", type=int, default=60)

    run = commands.add_parser("run", help="run the study's notebooks with papermill for a profile")
    run.add_argument("--profile", default="toy", help="smoke, toy, paper, or a path to a profile YAML")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile key (value parsed as YAML), e.g. --set seeds=[0,1]")

    from .train import TrainConfig

    train = commands.add_parser("train", help="train one block-wise adapter")
    train.add_argument("--config", help="YAML or JSON file with TrainConfig keys; flags override it")
    configs.add_arguments(train, TrainConfig)

    from .pretrain import PretrainConfig

    pretrain = commands.add_parser("pretrain", help="pretrain the toy world's micro SD (resumable) into data/toy-sd")
    pretrain.add_argument("--config", help="YAML or JSON file with PretrainConfig keys")
    configs.add_arguments(pretrain, PretrainConfig)

    probe = commands.add_parser("probe", help="train the toy world's probe into data/toy-probe.safetensors")
    probe.add_argument("--steps", type=int, default=600)

    sweep = commands.add_parser("sweep", help="block sweep: style LoCon on every block and block pair (after the study)")
    sweep.add_argument("--profile", default="toy")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    gates = commands.add_parser("gates", help="measure the toy world's quality gates (after the toy study ran)")
    gates.add_argument("--profile", default="toy")
    gates.add_argument("--count", type=int, default=64)

    findings = commands.add_parser("findings", help="the paper's claims C1-C3 decided from a study's results table")
    findings.add_argument("--profile", default="toy")

    inspect = commands.add_parser("inspect", help="method, blocks, ranks and parameters of an adapter file")
    inspect.add_argument("path")

    export = commands.add_parser("export-kohya", help="convert a bwl adapter to kohya/A1111 format")
    export.add_argument("path")
    export.add_argument("out")

    imp = commands.add_parser("import-kohya", help="convert a kohya SD1.x LoRA/LoCon to a bwl adapter")
    imp.add_argument("path")
    imp.add_argument("out")
    imp.add_argument("--model", required=True, help="base model id or directory (for module names)")

    args = parser.parse_args(argv)
    if args.command == "inspect":
        from .kohya import inspect_adapter

        print(inspect_adapter(args.path).table())
    elif args.command == "export-kohya":
        from .kohya import export_kohya

        print(export_kohya(args.path, args.out))
    elif args.command == "import-kohya":
        from .kohya import import_kohya
        from .pipeline import load_pipeline

        print(import_kohya(args.path, load_pipeline(args.model).unet, args.out))
    elif args.command == "train":
        from .train import train as run_training

        print(run_training(configs.from_args(TrainConfig, args)))
    elif args.command == "pretrain":
        from .pretrain import pretrain as run_pretraining

        print(run_pretraining(configs.from_args(PretrainConfig, args)))
    elif args.command == "probe":
        from .toy import train_and_save_probe

        print(json.dumps(train_and_save_probe(steps=args.steps), indent=2))
    elif args.command == "sweep":
        from .study import Study, load_profile, run_sweep, sweep_figure

        study = Study(load_profile(args.profile, _overrides(parser, args.overrides)))
        csv_path = run_sweep(study)
        print(sweep_figure(csv_path, csv_path.with_suffix(".png")))
    elif args.command == "gates":
        from .quality import gates as measure_gates

        print(json.dumps(measure_gates(args.profile, args.count), indent=2))
    elif args.command == "findings":
        from .findings import findings_markdown
        from .study import Study, load_profile

        print(findings_markdown(Study(load_profile(args.profile)).results()))
    elif args.command == "run":
        from .run import run_study

        run_study(args.profile, _overrides(parser, args.overrides))
    elif args.command == "demo":
        from .demo import run_demo

        print(run_demo(args.out, steps=args.steps))
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
