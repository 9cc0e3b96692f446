"""``torchrun --nproc-per-node 2`` on gloo, end to end: the bundle rank 0 writes is evaluated and served."""

import json
import os
import signal
import subprocess
import sys

import pytest

from funnel.bundle import resolve
from funnel.server.app import create_server
from funnel.server.engine import Engine
from funnel.tools.evaluate import evaluate
from funnel.tools.recommend import recommend
from funnel.tools.train import torchrun_command

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ddp_bundle(tiny_log_path, tmp_path_factory):
    # torchrun's module under this interpreter, so a run in another venv (the wheel check) trains with that venv's funnel.
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    root = str(tmp_path_factory.mktemp("ddp"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [*torchrun, "--nproc-per-node", "2", "--standalone", "-m", "funnel.tools", "train", "--events", tiny_log_path, "--out", root, "--epochs", "3", "--no-progress"]
    # Its own session, so a hang is cleaned up with torchrun's workers, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    printed = [line for line in out.splitlines() if line.startswith("{")]
    assert len(printed) == 1, out  # rank 0 alone reports (and writes)
    return root, json.loads(printed[0])["bundle"], err


def test_two_processes_train_one_bundle(ddp_bundle):
    root, version, log = ddp_bundle
    assert resolve(root) == version and len(os.listdir(f"{root}/versions")) == 1
    with open(f"{version}/manifest.json") as fh:
        training = json.load(fh)["training"]
    assert training["processes"] == 2
    assert training["two_tower"]["processes"] == 2 and training["ranker"]["processes"] == 2
    assert training["two_tower"]["samples"] > 0 and training["ranker"]["samples"] > 0
    assert log.count("bundle written to") == 1 and "ranker epoch 1" in log


def test_evaluate_and_serve_accept_the_bundle(ddp_bundle, tiny_log_path):
    root, _, _ = ddp_bundle
    report = evaluate(bundle=root, events=tiny_log_path, progress=False)
    assert report["final"]["hr@50"] > 0
    engine = Engine.load(root)
    server, port = create_server("127.0.0.1:0", engine)
    server.start()
    try:
        user = engine.bundle.data.users.decode(engine.bundle.data.seqs.lengths.argmax()[None])[0]
        result = recommend(addr=f"127.0.0.1:{port}", user_id=str(user), k=10)
    finally:
        server.stop(None)
    assert len(result.items) == 10


def test_nproc_reruns_the_command_line_under_torchrun():
    argv = ["--verbose", "train", "--events", "log.csv", "--nproc", "2", "--out", "b", "--nproc=3", "--seed", "1"]
    cmd = torchrun_command(argv, 2)
    assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert cmd[7:] == ["funnel.tools", "--verbose", "train", "--events", "log.csv", "--out", "b", "--seed", "1"]
