"""scripts/gpu_session.sh runs on a lent GPU, where a task has one call's worth of device time: a bad flag or a
missing test file found there costs the whole session's numbers. So its plan (DRY_RUN=1) is checked here, every
benchmark command against that benchmark's own argument parser."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALL_STEPS = "tests engine prefix redisread rediswrite fast1b fast8b prefix8b engine-triton"


def dry_run(steps: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **({"STEPS": steps} if steps else {})}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], capture_output=True, text=True,
                          env=env, timeout=30)


def plan(steps: str | None = None) -> list[tuple[str, int, list[str]]]:
    done = dry_run(steps)
    assert done.returncode == 0, done.stderr
    lines = [shlex.split(line) for line in done.stdout.splitlines()]
    return [(name, int(cap), argv) for name, cap, *argv in lines]


def parse_with_the_benchmarks_parser(argv: list[str], monkeypatch) -> None:
    script = ROOT / argv[1]
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[2:]])
    module.parse_args()  # argparse exits (status 2) on a flag it does not know or a bad value


def test_the_default_plan_is_the_steps_in_order_of_value_within_one_call():
    steps = plan()
    assert [name for name, _, _ in steps] == ["tests", "engine", "prefix", "redisread", "rediswrite", "fast1b", "fast8b",
                                                "prefix8b"]
    assert all(cap <= 300 for _, cap, _ in steps)


@pytest.mark.parametrize("name, cap, argv", plan(ALL_STEPS), ids=lambda value: str(value)[:20])
def test_every_step_names_what_exists_and_flags_its_benchmark_accepts(name, cap, argv, monkeypatch):
    assert argv[0] == "python3"
    if argv[1:3] == ["-m", "pytest"]:
        paths = [arg for arg in argv[3:] if arg.startswith("tests/")]
        assert paths and all((ROOT / path).exists() for path in paths)
    else:
        assert argv[1].startswith("bench/")
        parse_with_the_benchmarks_parser(argv, monkeypatch)


def test_an_unknown_step_is_refused():
    done = dry_run("tests nonsense")
    assert done.returncode == 2 and "unknown step 'nonsense'" in done.stderr
