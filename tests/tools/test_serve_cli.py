import os
import signal
import subprocess
import sys
import time

import pytest

from funnel.server.app import ServerOptions, is_loopback, open_without_token
from funnel.tools.cli import main


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host) and open_without_token(host, ServerOptions()) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "myhost.example"])
def test_other_hosts_need_a_token(host):
    assert not is_loopback(host)
    assert "--insecure" in open_without_token(host, ServerOptions())
    assert open_without_token(host, ServerOptions(token="s3cret")) is None


def test_serve_refuses_an_open_public_bind_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FUNNEL_TOKEN", raising=False)
    assert main(["serve", "--bundle", str(tmp_path / "no-bundle"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without a token" in err and "--insecure" in err

CHILD = """
import signal, threading, time
from funnel.server.app import wait_for_stop


def announce():
    # Only once wait_for_stop has installed its handlers: a SIGTERM before that ends the process by default.
    while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        time.sleep(0.001)
    print("waiting", flush=True)


threading.Thread(target=announce, daemon=True).start()
wait_for_stop()
print("stopping", flush=True)
time.sleep(1.0)  # the drain: repeated signals must not cut it short
print("drained", flush=True)
"""


def test_a_burst_of_stop_signals_stops_the_server_once_and_lets_it_drain():
    """Two SIGTERMs close together (pkill, then the --processes parent relaying it) once
    deadlocked a handler that set a threading.Event: the server never stopped."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert proc.stdout.readline().strip() == "waiting"
        for _ in range(200):
            proc.send_signal(signal.SIGTERM)
        for _ in range(100):  # and more during the drain
            time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)  # a deadlocked handler never gets here: TimeoutExpired
    finally:
        proc.kill()
    assert out.split() == ["stopping", "drained"] and proc.returncode == 0
