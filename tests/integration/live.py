"""Helpers shared by the live (real engine) tests: launching servers and waiting on them.

`launch` / `serving` start `alignserve serve` through the CLI (the path users take) on a free
loopback port; `wait_healthy` is the one start-up poll every live server uses (alignserve or a
reference vLLM server): it returns once the probe answers 200 and fails at once, with the log's
tail, when the process exits first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
ALIGNSERVE = str(Path(sys.executable).parent / "alignserve")
# Engine start-up takes about a minute on 2 idle cores; far more on a shared, loaded machine.
START_TIMEOUT_S = float(os.environ.get("LIVE_START_TIMEOUT_S", "600"))
CORES = sorted(os.sched_getaffinity(0))


def pinned(k: int) -> dict[str, str]:
    """The environment that pins an engine's worker to this machine's k-th core (wrapping),
    or nothing on a single core. vLLM's "auto" binding pins every engine to the same first
    core, where two busy engines starve one another (tests/integration/conftest.py)."""
    if len(CORES) < 2:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": str(CORES[k % len(CORES)])}


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `start` put the server in: the server and its engine core and
    workers, which would otherwise outlive a server killed during start-up."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path,
                 timeout: float = START_TIMEOUT_S) -> None:
    """Return once GET `url` answers 200; RuntimeError (with the log's tail) when `proc`
    exits first or `timeout` passes (then `proc` is killed)."""
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n"
                               f"{log.read_text()[-5000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        ok = wait_until(up, timeout, poll=0.5)
    except RuntimeError:
        kill_group(proc)  # its engine core may outlive it
        raise
    if not ok:
        kill_group(proc)
        raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n"
                           f"{log.read_text()[-5000:]}")


class Server:
    def __init__(self, base_url: str, proc: subprocess.Popen, log: Path) -> None:
        self.base_url, self.proc, self.log = base_url, proc, log

    def metric(self, name: str) -> float:
        """Sum of all samples of a metric line (by exact name prefix) on /metrics."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"{name} not on /metrics"
        return total


# The test servers' context: small, so the KV cache and start-up stay small. A server started
# with `limits=()` has the model's own context (8,192 tokens) and the default limits.
TEST_LIMITS = ("--max-model-len", "1024", "--max-prompt-tokens", "512")


def start(log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
          limits: Sequence[str] = TEST_LIMITS) -> Server:
    """Start `alignserve serve` on a free loopback port without waiting for it (several can
    start in parallel: `wait_healthy` each afterwards)."""
    port = free_port()
    env = {**os.environ, "ALIGNSERVE_KV_CACHE_GIB": "2", "ALIGNSERVE_MAX_CONCURRENT_REQUESTS": "64",
           **(env or {})}
    cmd = [ALIGNSERVE, "serve", "--host", "127.0.0.1", "--port", str(port),
           *limits, *args]
    with open(log, "w") as fh:
        # its own process group, so that `kill_group` reaches the engine processes too
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def launch(log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
           probe: str = "/health") -> Server:
    """Start `alignserve serve` on a free loopback port; return once `probe` answers 200."""
    srv = start(log, args, env)
    wait_healthy(f"{srv.base_url}{probe}", srv.proc, log)
    return srv


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and stops its engine); if it hangs, SIGKILL to its group.
    The group is killed afterwards in any case: nothing of it outlives the test."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    kill_group(proc)


@contextlib.contextmanager
def serving(log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
            probe: str = "/ready", limits: Sequence[str] = TEST_LIMITS) -> Iterator[Server]:
    srv = start(log, args, env, limits)
    try:
        wait_healthy(f"{srv.base_url}{probe}", srv.proc, log)
        yield srv
    finally:
        stop(srv.proc)


HEADS_ADMIN_KEY = "live-heads-admin-key-0123456789abcdef"  # conftest.heads_server
RANDOM_HEAD_TEMPERATURE = 0.8  # the random CD-Q head's "rollout" temperature (test_tilt_law_live)


def random_cdq_head(folder: Path) -> Path:
    """A CD-Q head on the embedded backbone with random token values, no training: enough to
    check a law (its values spread by about one reward unit at a typical state, so a tilt moves
    the law visibly), and its cost is a trained head's."""
    import torch

    from heads.model import HeadConfig, ValueHead, load_causal_lm, save_checkpoint
    from runtime.startup import resolve_model

    model = Path(resolve_model("embedded"))
    lm = load_causal_lm(str(model))
    hidden, vocab = lm.config.hidden_size, lm.config.vocab_size
    head = ValueHead("cdq", hidden, vocab)
    with torch.no_grad():
        head.token.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        ids = torch.tensor([[1, 504, 3458, 282]])
        h = lm.get_decoder()(input_ids=ids).last_hidden_state[0, -1]
        head.token.weight.div_(float(head.q_all(h).std()))
    save_checkpoint(folder, head, HeadConfig(
        method="cdq", backbone=str(model), reference=str(model), hidden_size=hidden,
        vocab_size=vocab, temperature=RANDOM_HEAD_TEMPERATURE, top_p=1.0,
        value_range=[-50.0, 50.0]))
    return folder
