"""Time the README's commands from a fresh clone, and record each in ``benchmarks/results/commands.md``.

    python benchmarks/time_commands.py study          # `make study` in a fresh clone of HEAD
    python benchmarks/time_commands.py test --env BWL_REQUIRE_BROWSER=1

For ``study`` the clone shares this checkout's ``.venv``, so the time is the study's own (setup apart), and the
clone's ``figures/results.md`` and ``findings.md`` are kept in ``runs/time-study/`` to compare with the committed
ones. ``test`` runs CI's script, which sets up its own ``.venv`` in the clone, so its time includes setup. A row names
the commit, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "results" / "commands.md"
HEADER = ["| command | commit | machine | date | minutes | result |", "|---|---|---|---|---|---|"]
TARGETS = {"study": "python -m bwl run --profile toy", "test": "bash .ci/run"}  # what `make <target>` runs


def cpu() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    flags = Path("/proc/cpuinfo").read_text()
    return f"{model}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in flags else 'AVX2'}"


def record(command: str, commit: str, minutes: float, result: str) -> None:
    rows = [line for line in (TABLE.read_text().splitlines() if TABLE.exists() else []) if line.startswith("| `")]
    rows = [r for r in rows if not r.startswith(f"| `{command}` | {commit} |")]
    rows.append(f"| `{command}` | {commit} | {cpu()} | {datetime.date.today()} | {minutes:.1f} | {result} |")
    TABLE.write_text("Each command timed from a fresh clone of the commit named, alone on the machine, "
                     "by `python benchmarks/time_commands.py`.\n\n" + "\n".join(HEADER + sorted(rows)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--note", default="", help="what else the row should say (e.g. the kernels it ran with)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", args.commit], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "bwl"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
        if (ROOT.parent / "shared").is_dir():  # as CI has it: the photos beside the clone
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
        if args.target == "study":
            env.update(PYTHONPATH=str(clone), PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
        started = time.time()
        done = subprocess.run(TARGETS[args.target], shell=True, cwd=clone, env=env, capture_output=True, text=True)
        minutes = (time.time() - started) / 60
        kept = ROOT / "runs" / f"time-{args.target}"
        kept.mkdir(parents=True, exist_ok=True)
        (kept / "log.txt").write_text(done.stdout + done.stderr)
        for name in ("results.md", "findings.md"):
            if (clone / "figures" / name).exists():
                (kept / name).write_bytes((clone / "figures" / name).read_bytes())
        summary = re.findall(r"\d+ passed[^\n]*", done.stdout)
        result = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        result += ": " + "; ".join(s.strip("= ") for s in summary) if summary else ""
        result += f"; {args.note}" if args.note else ""
    record(f"make {args.target}", commit, minutes, result)
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
