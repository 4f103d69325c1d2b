"""``kvtier bench``: run the benchmarks in a kvtier checkout's ``bench/`` directory, each in a process of its own
(progress bars on stderr, its Markdown table on stdout as rows come), and collect each one's table, JSON rows and
PNG plot into one directory with a ``summary.md``. The benchmarks themselves stay plain scripts (``bench/*.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@dataclass(frozen=True)
class Benchmark:
    script: str
    about: str
    quick_args: tuple[str, ...]  # a smoke run in seconds on a laptop CPU (any flag given after overrides them)
    needs_redis: bool = False


BENCHMARKS = {
    "engine": Benchmark("engine_throughput.py", "prefill and decode tokens/s by batch size",
                        ("--batch-sizes", "1,4", "--prompt-len", "32", "--decode-tokens", "8")),
    "prefix": Benchmark("prefix_reuse.py", "time to first token: the prefix recomputed, or found in each tier",
                        ("--model", "tiny", "--prefix-lens", "256"), needs_redis=True),
    "host": Benchmark("host_overhead.py", "host work per decode step, the model stubbed",
                      ("--model", "tiny", "--batch-sizes", "1,8", "--contexts", "64", "--decode-steps", "8")),
    "serving": Benchmark("serving.py",
                         "routing policies over gRPC on a local Ray cluster, request priority, router overhead",
                         ("--requests", "8", "--prefix-len", "256", "--overhead-streams", "40",
                          "--policies", "cache_aware")),
}


def add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="run the benchmarks with progress bars; tables, JSON and PNG plots go to --out-dir",
        description="Runs bench/*.py of this checkout. Flags it does not know are passed to the benchmark "
                    "(one benchmark at a time), e.g. `kvtier bench engine --batch-sizes 1,32,128`.")
    bench.add_argument("benchmarks", nargs="*", type=_benchmark_name,
                       metavar="{" + ",".join([*BENCHMARKS, "all"]) + "}",
                       help="which to run (default all; prefix is skipped in `all` without --redis-url)")
    bench.add_argument("--out-dir", default="bench-results", help="where tables, JSON and plots go")
    bench.add_argument("--model", help="preset or model directory (default: each benchmark's own)")
    bench.add_argument("--redis-url", help="a Redis the prefix benchmark may write to (loopback)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(handler=run_bench)


def _benchmark_name(name: str) -> str:
    if name not in (*BENCHMARKS, "all"):
        raise argparse.ArgumentTypeError(f"{name!r} is not a benchmark (choose from {', '.join(BENCHMARKS)}, all)")
    return name


def run_bench(args: argparse.Namespace) -> int:
    args.benchmarks = args.benchmarks or ["all"]
    names = list(BENCHMARKS) if "all" in args.benchmarks else list(dict.fromkeys(args.benchmarks))
    _check_can_run(names, args)
    if "all" in args.benchmarks and not args.redis_url:
        print("kvtier bench: skipping prefix (give --redis-url to run it)", file=sys.stderr)
        names.remove("prefix")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, failed = [], []
    for index, name in enumerate(names, 1):
        print(f"kvtier bench [{index}/{len(names)}] {name}: {BENCHMARKS[name].about}", file=sys.stderr, flush=True)
        command = bench_command(name, args, out_dir)
        began = time.monotonic()
        code, table = _run_streaming(command)
        sections.append(_section(name, command, table, out_dir, code, time.monotonic() - began))
        if code != 0:
            failed.append(f"{name} (exit {code})")
    (out_dir / "summary.md").write_text(_summary(sections))
    print(f"kvtier bench: results in {out_dir}/ (summary.md, *.json, *.png)", file=sys.stderr)
    if failed:
        print(f"kvtier: error: benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _check_can_run(names: list[str], args: argparse.Namespace) -> None:
    if not (BENCH_DIR / "common.py").exists():
        raise ConfigError(f"kvtier bench runs the benchmarks of a source checkout; none at {BENCH_DIR} (install "
                          "kvtier from a checkout: pip install -e '.[bench]')")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("kvtier bench writes PNG plots with matplotlib: pip install -e '.[bench]'")
    if args.extra and len(names) != 1:
        raise ConfigError(f"flags {' '.join(args.extra)} go to one benchmark: name exactly one")
    if "prefix" in args.benchmarks and not args.redis_url:
        raise ConfigError("--redis-url: the prefix benchmark needs a Redis it may write to")


def bench_command(name: str, args: argparse.Namespace, out_dir: Path) -> list[str]:
    spec = BENCHMARKS[name]
    command = [sys.executable, str(BENCH_DIR / spec.script), *(spec.quick_args if args.quick else ())]
    if args.model:
        command += ["--model", args.model]
    if spec.needs_redis:
        command += ["--redis-url", args.redis_url]
    return [*command, "--plot", str(out_dir / f"{name}.png"), "--json-out", str(out_dir / f"{name}.json"),
            *args.extra]


def _run_streaming(command: list[str]) -> tuple[int, str]:
    """Run ``command`` with stderr (its progress bars) on ours; echo and keep its stdout (the table)."""
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return process.returncode, "".join(lines)


def _section(name: str, command: list[str], table: str, out_dir: Path, code: int, seconds: float) -> str:
    shown = shlex.join([Path(command[0]).name, *command[1:]])
    plot = f"![{name}]({name}.png)\n" if (out_dir / f"{name}.png").exists() else "(no plot)\n"
    status = "" if code == 0 else f"**failed with exit code {code}**\n\n"
    return (f"## {name}: {BENCHMARKS[name].about}\n\n{status}    {shown}\n\n{table.strip()}\n\n{plot}\n"
            f"({seconds:.0f} s)\n")


def _summary(sections: list[str]) -> str:
    return f"# kvtier benchmarks, {time.strftime('%Y-%m-%d %H:%M')}\n\n" + "\n".join(sections)
