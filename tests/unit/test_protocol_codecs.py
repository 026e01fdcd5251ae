"""The protocol codecs' cases (protocol_codecs_cases.py) in an interpreter of their own.

The runtime's generated gRPC modules and tritonclient's define the same protobuf symbols (package `inference`)
in different files, and one process's default descriptor pool refuses the second set. The other tests drive
the runtime with tritonclient in this process, so the codecs, which import the runtime's modules, run apart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("protocol_codecs_cases.py")


def test_protocol_codecs():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
