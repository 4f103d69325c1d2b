"""What ``kvtier status`` shows: the router's ``GetClusterInfo`` and ``GetStats`` answers turned into a report
(JSON-ready dicts) and rendered as tables. No I/O here.

Hit rates are shares of the prompt blocks the worker looked up (GPU hits + GPU misses): every looked-up block
is found in exactly one tier or computed, so a worker's three hit rates and its miss rate add up to 1.
"""

from __future__ import annotations

from kvstore.stats import TIERS
from protos.kvtier.v1 import generation_pb2 as pb

_TIER_NAMES = {"gpu": "GPU", "cpu": "CPU", "redis": "Redis"}


def status_report(info: pb.ClusterInfo, stats: pb.Stats) -> dict:
    workers = [worker_status(worker, stats.workers.get(worker.worker_id)) for worker in info.workers]
    return {
        "model": info.model, "fingerprint": info.fingerprint, "routing_policy": info.routing_policy,
        "ready": info.ready, "max_model_len": info.max_model_len, "block_size": info.block_size,
        "workers": workers, "totals": _totals(workers),
    }


def worker_status(worker: pb.WorkerInfo, stats: pb.WorkerStats | None) -> dict:
    tiers = {tier: dict(stats.tiers[tier].counters) if stats and tier in stats.tiers else {} for tier in TIERS}
    engine = dict(stats.engine) if stats else {}
    looked_up = tiers["gpu"].get("hit_blocks", 0) + tiers["gpu"].get("miss_blocks", 0)
    redis = tiers["redis"]
    return {
        "worker_id": worker.worker_id, "address": worker.address, "healthy": worker.healthy,
        "reporting": stats is not None, "tensor_parallel_size": worker.tensor_parallel_size,
        "running": int(engine.get("running", 0)), "waiting": int(engine.get("waiting", 0)),
        "preemptions": int(engine.get("preemptions", 0)),
        "priority_preemptions": int(engine.get("priority_preemptions", 0)),
        "looked_up_blocks": int(looked_up),
        "tiers": {tier: _tier_status(values, looked_up) for tier, values in tiers.items()},
        "redis": None if "up" not in redis else {
            "up": bool(redis["up"]), "breaker_open": bool(redis.get("breaker_open", 0)),
            "ping_ms": redis["ping_seconds"] * 1e3 if "ping_seconds" in redis else None,
            "used_memory_bytes": int(redis.get("used_memory_bytes", 0)),
            "max_memory_bytes": int(redis.get("max_memory_bytes", 0)),
            "errors": int(redis.get("errors", 0)), "dropped_writes": int(redis.get("dropped_writes", 0)),
        },
    }


def _tier_status(values: dict[str, float], looked_up: float) -> dict:
    hits = int(values.get("hit_blocks", 0))
    status = {"hit_blocks": hits, "hit_rate": hits / looked_up if looked_up else None}
    for gauge in ("used_blocks", "cached_blocks", "capacity_blocks"):
        if gauge in values:
            status[gauge] = int(values[gauge])
    return status


def _totals(workers: list[dict]) -> dict:
    looked_up = sum(w["looked_up_blocks"] for w in workers)
    totals = {"workers": len(workers), "healthy": sum(w["healthy"] for w in workers),
              "running": sum(w["running"] for w in workers), "waiting": sum(w["waiting"] for w in workers),
              "preemptions": sum(w["preemptions"] for w in workers),
              "priority_preemptions": sum(w["priority_preemptions"] for w in workers),
              "looked_up_blocks": looked_up, "tiers": {}}
    for tier in TIERS:
        per_worker = [w["tiers"][tier] for w in workers]
        hits = sum(t["hit_blocks"] for t in per_worker)
        tier_total = {"hit_blocks": hits, "hit_rate": hits / looked_up if looked_up else None}
        for gauge in ("used_blocks", "cached_blocks", "capacity_blocks"):
            if any(gauge in t for t in per_worker):
                tier_total[gauge] = sum(t.get(gauge, 0) for t in per_worker)
        totals["tiers"][tier] = tier_total
    return totals


# --- rendering -----------------------------------------------------------------------------------------------


def render_status(report: dict, server: str) -> str:
    totals = report["totals"]
    lines = [
        f"kvtier at {server}: model {report['model']} (fingerprint {report['fingerprint'][:16]}), "
        f"policy {report['routing_policy']}, {'ready' if report['ready'] else 'NOT READY'}",
        f"workers {totals['workers']} ({totals['healthy']} healthy); requests running {totals['running']}, "
        f"waiting {totals['waiting']}",
        "",
        *_worker_table(report["workers"], totals),
    ]
    redis_rows = [w for w in report["workers"] if w["redis"] is not None]
    lines += ["", *(_redis_table(redis_rows) if redis_rows else ["Redis tier: not configured"])]
    return "\n".join(lines)


def _worker_table(workers: list[dict], totals: dict) -> list[str]:
    headers = ["worker", "state", "tp", "run", "wait", "preempted", "GPU used", "GPU cached", "CPU used",
               *(f"hit {_TIER_NAMES[t]}" for t in TIERS), "looked up", "address"]
    rows = [[w["worker_id"], _state(w), str(w["tensor_parallel_size"]), str(w["running"]), str(w["waiting"]),
             _preempted(w), *_tier_cells(w["tiers"]), *(_percent(w["tiers"][t]["hit_rate"]) for t in TIERS),
             str(w["looked_up_blocks"]), w["address"]] for w in workers]
    rows.append(["all", "", "", str(totals["running"]), str(totals["waiting"]), _preempted(totals),
                 *_tier_cells(totals["tiers"]), *(_percent(totals["tiers"][t]["hit_rate"]) for t in TIERS),
                 str(totals["looked_up_blocks"]), ""])
    return render_table(headers, rows, left_aligned={0, 1, len(headers) - 1})


def _preempted(counts: dict) -> str:
    """Preemptions, and of them those that made room for a more urgent request (when there were any)."""
    urgent = counts["priority_preemptions"]
    return f"{counts['preemptions']} ({urgent} for priority)" if urgent else str(counts["preemptions"])


def _tier_cells(tiers: dict) -> list[str]:
    gpu, cpu = tiers["gpu"], tiers["cpu"]
    return [_fill(gpu.get("used_blocks"), gpu.get("capacity_blocks")), _count(gpu.get("cached_blocks")),
            _fill(cpu.get("used_blocks"), cpu.get("capacity_blocks"))]


def _redis_table(workers: list[dict]) -> list[str]:
    headers = ["Redis, seen by", "state", "breaker", "ping ms", "memory used / max", "errors", "dropped writes"]
    rows = []
    for worker in workers:
        redis = worker["redis"]
        ping = f"{redis['ping_ms']:.2f}" if redis["ping_ms"] is not None else "-"
        rows.append([worker["worker_id"], "up" if redis["up"] else "DOWN", "open" if redis["breaker_open"] else
                     "closed", ping, _memory(redis), str(redis["errors"]), str(redis["dropped_writes"])])
    return render_table(headers, rows, left_aligned={0, 1, 2})


def _state(worker: dict) -> str:
    if not worker["reporting"]:
        return "no stats"
    return "healthy" if worker["healthy"] else "UNHEALTHY"


def _fill(used: int | None, capacity: int | None) -> str:
    if used is None or not capacity:
        return "-"
    return f"{used}/{capacity} ({used / capacity:.0%})"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _memory(redis: dict) -> str:
    used, limit = redis["used_memory_bytes"], redis["max_memory_bytes"]
    if not redis["up"]:
        return "-"
    if not limit:
        return f"{_mib(used)} / no limit"
    return f"{_mib(used)} / {_mib(limit)} ({used / limit:.0%})"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def render_table(headers: list[str], rows: list[list[str]], left_aligned: set[int]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned unless their column is in ``left_aligned``."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        padded = [cell.ljust(width) if index in left_aligned else cell.rjust(width)
                  for index, (cell, width) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return [line(headers), *(line(row) for row in rows)]
