"""The forward's own GPU time, without what it waited for (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from workers.forward_timer import ForwardTimer

pytestmark = pytest.mark.gpu
CYCLES = 50_000_000  # tens of milliseconds of torch.cuda._sleep on any recent GPU


def test_the_forward_timer_leaves_out_the_copies_the_forward_waited_for():
    device = torch.device("cuda")
    copies = torch.cuda.Stream()
    with torch.cuda.stream(copies):
        torch.cuda._sleep(10 * CYCLES)  # tier copies the compute stream must wait for
    torch.cuda.current_stream().wait_stream(copies)
    timer = ForwardTimer(device)
    timer.start()
    torch.cuda._sleep(CYCLES)  # the forward
    timer.stop()
    alone = ForwardTimer(device)
    alone.start()
    torch.cuda._sleep(CYCLES)
    alone.stop()
    torch.cuda.synchronize()
    assert timer.seconds() == pytest.approx(alone.seconds(), rel=0.5)


def test_an_unfinished_forward_has_no_time_yet():
    timer = ForwardTimer(torch.device("cuda"))
    timer.start()
    torch.cuda._sleep(20 * CYCLES)
    timer.stop()
    assert timer.seconds() is None
    torch.cuda.synchronize()
    assert timer.seconds() > 0
