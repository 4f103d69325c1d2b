"""``kvtier status``'s report and tables from hand-built router answers: exact hit rates, fills and totals."""

from __future__ import annotations

from cluster.status_view import render_status, render_table, status_report
from protos.kvtier.v1 import generation_pb2 as pb


def worker_stats(gpu: dict, cpu: dict, redis: dict, running: int, waiting: int) -> pb.WorkerStats:
    tiers = {name: pb.TierStats(counters=values) for name, values in (("gpu", gpu), ("cpu", cpu), ("redis", redis))}
    engine = {"running": running, "waiting": waiting, "preemptions": 7, "priority_preemptions": 3}
    return pb.WorkerStats(engine=engine, tiers=tiers)


def two_workers() -> tuple[pb.ClusterInfo, pb.Stats]:
    info = pb.ClusterInfo(model="tiny", fingerprint="ab" * 32, routing_policy="cache_aware", ready=True,
                          workers=[pb.WorkerInfo(worker_id="w0", address="127.0.0.1:1", healthy=True,
                                                 tensor_parallel_size=1),
                                   pb.WorkerInfo(worker_id="w1", address="127.0.0.1:2", healthy=False,
                                                 tensor_parallel_size=2)])
    redis_up = {"up": 1, "breaker_open": 0, "ping_seconds": 0.0005, "used_memory_bytes": 2**20,
                "max_memory_bytes": 4 * 2**20, "hit_blocks": 2}
    stats = pb.Stats(workers={
        # w0 looked up 8 blocks: 4 on the GPU, 1 in the CPU tier, 2 in Redis, 1 computed
        "w0": worker_stats({"hit_blocks": 4, "miss_blocks": 4, "used_blocks": 3, "cached_blocks": 10,
                            "capacity_blocks": 20}, {"hit_blocks": 1, "used_blocks": 5, "capacity_blocks": 50},
                           redis_up, running=2, waiting=1),
    })
    return info, stats


def test_the_report_has_exact_hit_rates_fills_and_totals():
    report = status_report(*two_workers())
    w0, w1 = report["workers"]
    assert w0["looked_up_blocks"] == 8
    assert [w0["tiers"][t]["hit_rate"] for t in ("gpu", "cpu", "redis")] == [0.5, 0.125, 0.25]
    assert w0["tiers"]["gpu"] == {"hit_blocks": 4, "hit_rate": 0.5, "used_blocks": 3, "cached_blocks": 10,
                                  "capacity_blocks": 20}
    assert w0["redis"] == {"up": True, "breaker_open": False, "ping_ms": 0.5, "used_memory_bytes": 2**20,
                           "max_memory_bytes": 4 * 2**20, "errors": 0, "dropped_writes": 0}
    assert (w0["running"], w0["waiting"], w0["preemptions"], w0["priority_preemptions"]) == (2, 1, 7, 3)
    assert w1["reporting"] is False and w1["redis"] is None and w1["tiers"]["gpu"]["hit_rate"] is None
    totals = report["totals"]
    assert (totals["workers"], totals["healthy"], totals["running"], totals["waiting"]) == (2, 1, 2, 1)
    assert (totals["preemptions"], totals["priority_preemptions"]) == (7, 3)
    assert totals["tiers"]["cpu"] == {"hit_blocks": 1, "hit_rate": 0.125, "used_blocks": 5, "capacity_blocks": 50}


def test_the_rendered_tables_show_every_worker_and_the_redis_probe():
    text = render_status(status_report(*two_workers()), "127.0.0.1:50051")
    lines = text.splitlines()
    assert lines[0] == ("kvtier at 127.0.0.1:50051: model tiny (fingerprint abababababababab), policy cache_aware, "
                        "ready")
    assert lines[1] == "workers 2 (1 healthy); requests running 2, waiting 1"
    header, w0, w1, total = lines[3:7]
    assert header.split() == ["worker", "state", "tp", "run", "wait", "preempted", "GPU", "used", "GPU", "cached",
                              "CPU", "used", "hit", "GPU", "hit", "CPU", "hit", "Redis", "looked", "up", "address"]
    assert w0.split() == ["w0", "healthy", "1", "2", "1", "7", "(3", "for", "priority)", "3/20", "(15%)", "10",
                          "5/50", "(10%)", "50.0%", "12.5%", "25.0%", "8", "127.0.0.1:1"]
    assert w1.split() == ["w1", "no", "stats", "2", "0", "0", "0", "-", "-", "-", "-", "-", "-", "0", "127.0.0.1:2"]
    assert total.split() == ["all", "2", "1", "7", "(3", "for", "priority)", "3/20", "(15%)", "10", "5/50", "(10%)",
                             "50.0%", "12.5%", "25.0%", "8"]
    assert lines[8].split()[:3] == ["Redis,", "seen", "by"]
    assert lines[9].split() == ["w0", "up", "closed", "0.50", "1.0", "MiB", "/", "4.0", "MiB", "(25%)", "0", "0"]


def test_a_down_redis_and_an_absent_one_are_told_apart():
    info, stats = two_workers()
    stats.workers["w0"].tiers["redis"].counters.update(up=0, breaker_open=1)
    del stats.workers["w0"].tiers["redis"].counters["ping_seconds"]
    lines = render_status(status_report(info, stats), "x").splitlines()
    assert lines[9].split() == ["w0", "DOWN", "open", "-", "-", "0", "0"]
    del stats.workers["w0"].tiers["redis"].counters["up"]
    assert render_status(status_report(info, stats), "x").splitlines()[-1] == "Redis tier: not configured"


def test_tables_pad_columns_and_align_numbers_right():
    assert render_table(["name", "n"], [["a", "1"], ["bbb", "100"]], left_aligned={0}) == [
        "name    n", "a       1", "bbb   100"]
