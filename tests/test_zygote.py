"""The suite's warm interpreter (`tests/zygote.py`): a run forked from it behaves as the fresh interpreter it stands
for, in what the tests read of a process: its output, exit status, signals, environment, working directory and
arguments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import PY, ZYGOTE, command, run_cli

pytestmark = pytest.mark.skipif("TESSERA_TEST_ZYGOTE" not in os.environ, reason="the suite runs without a zygote")

SCRIPT = """
import os, sys, torch
print("argv", sys.argv[1:], "cwd", os.getcwd(), "seen", os.environ.get("SEEN"), "threads", torch.get_num_threads(),
      "pid", os.getpid(), flush=True)
print("path0", sys.path[0], file=sys.stderr)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "raise":
    raise ValueError("a fault a user can see")
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "wait":
    import signal, time
    signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
    print("waiting", flush=True)
    time.sleep(60)
if mode == "stdin":
    print("read", sys.stdin.read().strip())
"""


def _warm() -> None:
    """Wait for this worker's zygote to have imported everything (its socket appears then)."""
    deadline = time.time() + 120
    while not os.path.exists(os.environ["TESSERA_TEST_ZYGOTE"]) and time.time() < deadline:
        time.sleep(0.2)


@pytest.fixture
def script(tmp_path):
    _warm()
    path = tmp_path / "run.py"
    path.write_text(SCRIPT)
    return path


def test_a_run_gets_its_arguments_environment_directory_and_threads(script, tmp_path):
    assert command([PY, str(script)])[:2] == [PY, str(ZYGOTE)]
    proc = run_cli([PY, str(script), "exit", "3"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3
    assert f"argv ['exit', '3'] cwd {tmp_path} seen None threads 1" in proc.stdout
    assert f"path0 {tmp_path}" in proc.stderr  # a script's folder first on sys.path, as python puts it
    os.environ["SEEN"] = "yes"  # the client's environment, not the zygote's
    try:
        proc = run_cli([PY, str(script), "exit", "0"], cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    finally:
        del os.environ["SEEN"]
    assert proc.returncode == 0 and "seen yes threads 2" in proc.stdout


def test_a_module_runs_as_main_with_the_working_directory_first_on_the_path(tmp_path):
    _warm()
    proc = run_cli([PY, "-m", "tessera.data.make_shards", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower()
    assert "RuntimeWarning" not in proc.stderr  # no "found in sys.modules" from runpy: the module runs once


def test_a_fault_is_a_traceback_and_status_1_and_a_kill_is_the_signal(script):
    proc = run_cli([PY, str(script), "raise"])
    assert proc.returncode == 1 and "ValueError: a fault a user can see" in proc.stderr
    assert "zygote.py" not in proc.stderr  # the traceback is the run's own
    assert run_cli([PY, str(script), "kill"]).returncode == -signal.SIGKILL


def test_signals_reach_the_run_and_stdin_is_its_own(script):
    proc = subprocess.Popen(
        command([PY, str(script), "wait"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().startswith("argv")
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "got SIGTERM" in out
    got = subprocess.run(command([PY, str(script), "stdin"]), input="hello\n", capture_output=True, text=True)
    assert "read hello" in got.stdout


def test_a_run_dies_with_its_client(script):
    """As torchrun's SIGKILL of a rank, or a test's timeout, would leave it otherwise: the run is not the client's
    child but the zygote's, so its manager kills it when the client goes."""
    proc = subprocess.Popen(command([PY, str(script), "wait"]), stdout=subprocess.PIPE, text=True)
    run = int(proc.stdout.readline().split()[-1])
    assert run != proc.pid and proc.stdout.readline().strip() == "waiting"
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{run}") and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{run}")


def test_an_environment_read_at_start_gets_a_fresh_interpreter():
    args = [PY, "-m", "tessera.train.pretrain", "--help"]
    assert command(args, {"MALLOC_ARENA_MAX": "2"}) == args and command([PY, "-c", "print(1)"])[1] == "-c"
    assert sys.executable == PY
