"""A software TPM for tests: ``swtpm`` on free loopback ports, with its own state folder (shared by the TPM tests
of every package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

try:
    import tpm2_pytss
except ImportError:
    tpm2_pytss = None

needs_swtpm = pytest.mark.skipif(tpm2_pytss is None or shutil.which("swtpm") is None,
                                 reason="swtpm or tpm2-pytss is not installed (apt-get install swtpm swtpm-tools "
                                        "libtss2-dev, pip install 'chiplock[tpm]'; `make test` does both as root)")


def free_port_pair() -> int:
    """A port P with P and P+1 free on the loopback interface (swtpm's data and control ports)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two adjacent free loopback ports")


class Swtpm:
    """A swtpm process with its own state folder; ``restart`` keeps the state (a reboot of the same TPM)."""

    def __init__(self, state_dir) -> None:
        self.state_dir = state_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Swtpm:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port_pair()
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()  # the port was taken in between, or swtpm failed: try another port
        raise RuntimeError("swtpm did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
            self.proc = None

    def restart(self) -> Swtpm:
        self.stop()
        return self.start()
