"""A warm interpreter for the suite's command runs. Starting `python -m tessera.train.pretrain` spends about 8 s of
its 9 on 2 cores importing torch, torchvision, open_clip, transformers and DeepSpeed; the suite starts a few hundred
such processes (every torchrun rank is one). The zygote imports them once, then forks a fresh process per run.

    python tests/zygote.py serve SOCKET          # the server: imports, then forks a run per connection
    python tests/zygote.py -m MODULE ARGS...     # a run, as `python -m MODULE ARGS...` would be
    python tests/zygote.py SCRIPT ARGS...        # a run, as `python SCRIPT ARGS...` would be

A run's client (the second and third forms) is a small process of its own, so whoever starts it (pytest, torchrun
as `--no-python` entrypoint) sees a real process: it hands its stdin/stdout/stderr, arguments, environment and
working directory to the server, forwards the signals it receives, and exits as the run did (by the same signal
where the run was killed). The server forks a manager per connection, and the manager forks the run: the run gets
the client's descriptors and environment, seeds its random state afresh, takes the thread count its environment
asks for, runs the module or script as `__main__`, and ends as an interpreter ends (atexit handlers, flushed
streams). If the client dies, the manager kills the run. Without a server (TESSERA_TEST_ZYGOTE unset or not
answering), the client simply execs the real interpreter.

What a warm interpreter cannot show is what happens at import: the suite starts real interpreters for the tests
that depend on it (`conftest.command` keeps a run out of the zygote when its environment changes more than the
allowed keys, and `python -c` runs never use it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

ENV = "TESSERA_TEST_ZYGOTE"  # the server's socket path
PYTHON = "TESSERA_TEST_PYTHON"  # the interpreter a client falls back to
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


# ------------------------------------------------------------------------------------------------ the client


def _fallback(argv: list[str]) -> None:
    python = os.environ.get(PYTHON, sys.executable)
    os.execv(python, [python, *argv])


def client(argv: list[str]) -> None:
    path = os.environ.get(ENV)
    if not path or argv[:1] == ["-c"]:
        _fallback(argv)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        _fallback(argv)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: conn.sendall(json.dumps({"signal": signum}).encode() + b"\n"))
    reply = b""
    while b"\n" not in reply:
        try:
            chunk = conn.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            sys.stderr.write("zygote: the server went away before the run ended\n")
            os._exit(70)
        reply += chunk
    status = json.loads(reply.split(b"\n", 1)[0])["status"]
    if status < 0:  # killed by a signal: die by it too, so the parent sees the same returncode
        if -status not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


# ------------------------------------------------------------------------------------------------ the server


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int.from_bytes(data[:8], "big")
    body = data[8:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the client went away")
        body += chunk
    return json.loads(body), fds


def _run(request: dict, fds: list[int]) -> None:
    """In the run's process: become the process the client stands for, run it, end as an interpreter does."""
    import io
    import random

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    for sig in range(1, signal.NSIG):  # a fresh interpreter's handlers
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython starts
    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    torch.manual_seed(67280421310721)  # torch's default seed in a fresh process
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else len(os.sched_getaffinity(0)))
    _exit(_execute(request["argv"]))


def _execute(argv: list[str]) -> int:
    """Run `argv` (`-m MODULE ...` or `SCRIPT ...`) as `__main__`; its exit status, as the interpreter would give it
    (an uncaught exception's traceback printed, without this file's frames)."""
    import runpy
    import traceback

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            sys.modules.pop(argv[1], None)  # imported here as a module; `python -m` runs it as __main__ only
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")):
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        return -signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    return 0


def _exit(code: int) -> None:
    """End as an interpreter ends (non-daemon threads joined, atexit handlers run, streams flushed), less the
    teardown of every imported module: about 2 s with torch, transformers and DeepSpeed loaded, and nothing a run's
    results depend on."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # an uncaught KeyboardInterrupt ends the process by SIGINT, as CPython does
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _manage(conn: socket.socket) -> None:
    """In the manager's process: fork the run, pass on signals, report how it ended."""
    request, fds = _recv_request(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds)
    for fd in fds:
        os.close(fd)
    buffer = b""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            try:
                conn.sendall(json.dumps({"status": code}).encode() + b"\n")
            except OSError:
                pass
            os._exit(0)
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable:
            chunk = conn.recv(4096)
            if not chunk:  # the client died: so does its run
                os.kill(pid, signal.SIGKILL)
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                os.kill(pid, json.loads(line)["signal"])


def _warm_up() -> None:
    """Import what the suite's runs import, in the order they do (nothing runs: no thread pool, no thread)."""
    import importlib

    import torch  # noqa: F401

    from tessera import modalities

    for module in (
        "tessera.train.distributed.deepspeed_setup",
        "tessera.train.pretrain",
        "tessera.train.finetune",
        "tessera.train.loop",
        "tessera.train.cli",
        "tessera.eval.retrieval",
        "tessera.eval.zeroshot",
        "tessera.eval.linear_probe",
        "tessera.tools.plan_batches",
        "tessera.data.demo",
        "tessera.data.make_shards",
        "torch.distributed.run",
        "deepspeed.utils.zero_to_fp32",
    ):
        importlib.import_module(module)
    for name in modalities.encoder_names():
        modalities.encoder_class(name)


def serve(path: str) -> None:
    _warm_up()
    import threading

    assert threading.active_count() == 1, f"zygote: threads after the imports: {threading.enumerate()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the socket appears only once the server is warm
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # managers are reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            manager = os.getpid()
            try:
                _manage(conn)
            finally:
                if os.getpid() == manager:
                    os._exit(0)
        conn.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        client(sys.argv[1:])
