"""What every benchmark shares: importing the repo's packages from a checkout, the engine and output flags,
progress bars, timing GPU work and the device's copy bandwidths, and writing results as JSON and a PNG plot
(what ``kvtier bench`` collects). torch is imported only by the functions that time things."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_engine_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", default=default_model, help="preset name or model directory")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="torch", help="torch or triton")


def add_output_args(parser: argparse.ArgumentParser, default_plot: str | None = None) -> None:
    parser.add_argument("--plot", default=default_plot, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--json-out", help="write the results here as JSON")


def progress(items: Iterable, description: str, total: int | None = None):
    """A progress bar on stderr (shown on a terminal, silent in logs and pipes)."""
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, file=sys.stderr, disable=None, leave=False)


def report(line: str) -> None:
    """One measurement on stdout as soon as it is taken, so a run cut short still shows what it measured."""
    print(f"- {line}", flush=True)


def write_json(path: str | None, benchmark: str, args: argparse.Namespace, rows: list[dict]) -> None:
    if path:
        settings = {key: value for key, value in vars(args).items() if key not in ("plot", "json_out", "child")}
        record = {"benchmark": benchmark, "settings": settings, "rows": rows}
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def bar_panels(path: str | None, title: str, panels: Sequence[tuple[str, list[str], dict[str, list[float]]]]) -> None:
    """One PNG of side-by-side grouped bar charts; each panel is (y label, group names, {series: values})."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (ylabel, groups, series) in zip(axes.flat, panels):
        width = 0.8 / len(series)
        for index, (label, values) in enumerate(series.items()):
            axis.bar([g + index * width for g in range(len(groups))], values, width, label=label)
        axis.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
        axis.set_ylabel(ylabel)
        if len(series) > 1:
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(fn) -> float:
    """Seconds ``fn()`` takes, the GPU's queued work included."""
    synchronize()
    began = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - began


def measure_bandwidths(device: str, num_bytes: int = 2**30) -> dict[str, float]:
    """GB/s: device copy (read + written bytes), pinned host-to-device; the best of 5."""
    import torch

    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    copy = min(synced(lambda: target.copy_(source)) for _ in range(5))
    upload = min(synced(lambda: target.copy_(host, non_blocking=True)) for _ in range(5))
    return {"d2d_GBps": 2 * num_bytes / copy / 1e9, "h2d_pinned_GBps": num_bytes / upload / 1e9}
