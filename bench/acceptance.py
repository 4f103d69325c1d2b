"""Issue 6's measured acceptance points, read from the benchmarks' JSON: each point's number, its bar, a verdict.

    python bench/acceptance.py --fast1b 1b.json --fast8b 8b.json --prefix8b prefix8b.json

The inputs are what ``bench/against_transformers.py --json-out`` (per model) and ``bench/prefix_reuse.py
--json-out`` (the 8B shape) write; a file not given, or a part a run did not reach, reads "not measured". It
prints a Markdown table; it judges, it measures nothing (scripts/gpu_session.sh runs it last on the GPU).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    name: str
    bar: str
    value: float | None
    passes: Callable[[float], bool]
    unit: str = ""
    missing: str = "not measured"  # what the measured cell says when there is no value

    def row(self) -> str:
        if self.value is None:
            return f"| {self.name} | {self.bar} | {self.missing} | - |"
        verdict = "pass" if self.passes(self.value) else "FAIL"
        return f"| {self.name} | {self.bar} | {self.value:,.3g}{self.unit} | {verdict} |"


def load_rows(path: str | None) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"] if path and Path(path).is_file() else []


def dig(record: dict, *keys: str) -> float | None:
    """record[k0][k1]...; None where a part is missing (a run cut short, a part skipped)."""
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def decode_points(shape: str, run: dict, utilisation_bar: float) -> Iterator[Point]:
    decode = run.get("decode", {})
    for batch, bar in (("1", 20.0), ("128", 10.0)):
        speedup = ratio(dig(decode, batch, "engine_tok_s"), dig(decode, batch, "transformers_tok_s"))
        yield Point(f"{shape} decode speed-up over transformers, batch {batch}", f">= {bar:g}x", speedup,
                    lambda v, bar=bar: v >= bar, "x")
    yield Point(f"{shape} bandwidth utilisation, batch 1", f">= {utilisation_bar}",
                dig(decode, "1", "bandwidth_utilisation"), lambda v: v >= utilisation_bar)
    for tokens in ("8192", "32768"):
        ttft = ratio(dig(run, "ttft", tokens, "engine_ms"), dig(run, "ttft", tokens, "transformers_ms"))
        yield Point(f"{shape} TTFT at {int(tokens):,} tokens / transformers forward", "<= 1", ttft, lambda v: v <= 1)
    yield Point(f"{shape} throughput with every tier on / off, nothing reused", ">= 0.97",
                dig(run, "overhead", "ratio") if dig(run, "overhead", "reused_blocks") == 0 else None,
                lambda v: v >= 0.97)


def prefix_points(rows: list[dict]) -> Iterator[Point]:
    by_length = {row["prefix_tokens"]: row for row in rows}
    at16k, at32k = by_length.get(16384, {}), by_length.get(32768, {})
    yield Point("8B GPU hit TTFT / recompute, 16k", "<= 0.10", ratio(at16k.get("gpu hit"), at16k.get("recompute")),
                lambda v: v <= 0.10)
    yield Point("8B CPU-tier hit TTFT / recompute, 16k", "<= 0.15",
                ratio(at16k.get("cpu hit"), at16k.get("recompute")), lambda v: v <= 0.15)
    yield Point("8B CPU->GPU load / pinned host-to-device, 16k", ">= 0.7",
                ratio(at16k.get("cpu GB/s"), at16k.get("h2d_pinned_GBps")), lambda v: v >= 0.7)
    yield Point("8B Redis hit (fresh process) TTFT / recompute, 32k", "<= 1.0 (stretch 0.6)",
                ratio(at32k.get("redis hit"), at32k.get("recompute")), lambda v: v <= 1.0)
    read_first = ", read first" if "redis GB/s, read first" in at32k else ""  # (--compare-reading)
    stopped = at32k.get("redis fetch stopped" + read_first)
    yield Point("8B Redis->GPU, 32k, whole prefix fetched", ">= 2.5 GB/s",
                None if stopped else at32k.get("redis GB/s" + read_first), lambda v: v >= 2.5, " GB/s",
                "the cost model stopped the fetch" if stopped else "not measured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast1b", help="against_transformers.py --json-out of the Llama-3.2-1B shape")
    parser.add_argument("--fast8b", help="the same for the Llama-3-8B shape")
    parser.add_argument("--prefix8b", help="prefix_reuse.py --json-out of the 8B shape at 16k and 32k")
    args = parser.parse_args()
    points = []
    for shape, path, utilisation_bar in (("1B", args.fast1b, 0.5), ("8B", args.fast8b, 0.7)):
        (run,) = load_rows(path) or [{}]
        points += decode_points(shape, run, utilisation_bar)
    points += prefix_points(load_rows(args.prefix8b))
    print("\n| issue 6 acceptance point | bar | measured | verdict |")
    print("|---|---|---:|---|")
    for point in points:
        print(point.row())


if __name__ == "__main__":
    main()
