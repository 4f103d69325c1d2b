"""The ``kvtier`` command on a Ctrl-C that comes while it is still importing torch and the rest (its first second
or two): "kvtier: interrupted" and exit 130, as later, not a traceback from inside torch's import."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def test_ctrl_c_while_the_command_imports_exits_130_without_a_traceback():
    kvtier = str(Path(sys.executable).parent / "kvtier")
    command = [kvtier, "generate", "--model", "tiny", "--prompt", "hi", "--max-tokens", "2000", "--temperature", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (not ignored)
    time.sleep(0.3)  # Python runs, torch is being imported
    for _ in range(10):  # again only if it was lost (a library's bare `except:` during an import can eat one)
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        process.kill()
        raise AssertionError("kvtier generate went on through ten Ctrl-Cs")
    assert process.returncode == 130, stderr[-3000:]
    assert "kvtier: interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
