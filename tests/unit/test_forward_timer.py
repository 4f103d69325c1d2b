import time

import torch

from workers.forward_timer import ForwardTimer


def test_on_the_cpu_the_host_clock_times_the_forward():
    timer = ForwardTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.02)
    timer.stop()
    time.sleep(0.05)  # after the forward: not counted
    assert 0.02 <= timer.seconds() < 0.06
