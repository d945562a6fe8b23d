"""`alignserve rollouts` on the real engine and model, then `alignserve dual` on its folder.

One engine start (about a minute): the rerun finds every prompt done and must not start one.
Partial resumes are covered on fakes (tests/unit/test_rollouts.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "alignserve")


def alignserve(*args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def folder(rollout_folder) -> Path:
    return rollout_folder


def test_rows_match_the_server_prompt_and_the_samples(folder):
    from transformers import AutoTokenizer

    from server.protocol import ChatCompletionRequest
    from server.serving import chat_prompt
    from valuenet.rollouts import read_rollouts

    manifest, rows = read_rollouts(folder)
    assert (manifest.n, manifest.max_tokens, manifest.reward, manifest.cost) == (
        2, 8, "relevance", "profanity")
    assert len(rows) == manifest.count == 4
    assert sorted((r.prompt_id, r.sample) for r in rows) == [
        ("dev-h00", 0), ("dev-h00", 1), ("dev-h01", 0), ("dev-h01", 1)]
    tok = AutoTokenizer.from_pretrained(manifest.extra["model_path"])
    # The server's own chat path, on the engine's tokenizer (vLLM loads the same HF tokenizer).
    for row in rows:
        req = ChatCompletionRequest(messages=[{"role": "user", "content": row.prompt}])
        (prompt,) = chat_prompt(tok, req)
        assert row.prompt_ids == prompt.ids
        assert 1 <= len(row.token_ids) <= 8 and len(row.logprobs) == len(row.token_ids)
        assert all(lp <= 0 and math.isfinite(lp) for lp in row.logprobs)
        assert tok.decode(row.token_ids, skip_special_tokens=True) == row.text
        assert math.isfinite(row.reward) and -1 <= row.reward <= 1
        assert row.cost is not None and 0 <= row.cost <= 1


def test_rerun_resumes_without_duplicates(folder):
    before = (folder / "rollouts.jsonl").read_text()
    p = alignserve(*json.loads((folder / "cmd.json").read_text()), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nothing to do" in p.stdout  # and so no engine was started
    assert (folder / "rollouts.jsonl").read_text() == before
    # other sampling settings are refused, not mixed in
    cmd = json.loads((folder / "cmd.json").read_text())
    cmd[cmd.index("--max-tokens") + 1] = "9"
    p = alignserve(*cmd, timeout=120)
    assert p.returncode == 2 and "max_tokens" in p.stderr


def test_dual_runs_on_the_folder(folder):
    from decoding.dual import load_solution

    rows = [json.loads(l) for l in (folder / "rollouts.jsonl").read_text().splitlines()]
    mean_g = -sum(r["cost"] for r in rows) / len(rows)
    p = alignserve("dual", "--rollouts", str(folder), "--beta", "0.1",
                   "--threshold", str(mean_g - 0.5), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "λ* =" in p.stdout
    sol = load_solution(folder / "dual.json")
    assert (sol.reward, sol.cost, sol.prompts, sol.samples) == ("relevance", "profanity", 2, 2)
    assert sol.reference_safety == pytest.approx(mean_g)
    assert sol.predicted_safety >= mean_g - 0.5 - 1e-9
    assert (folder / "dual.png").is_file()


def test_rollouts_from_a_running_server(server, tmp_path):
    """`--server`: the same rows through the session server's API (no engine started here):
    the server's chat-templated prompt ids, K samples with per-token log-probs, the server's
    scores; a rerun resumes."""
    from transformers import AutoTokenizer

    from runtime.model_prep import embedded_model_dir
    from server.settings import Settings
    from valuenet.rollouts import chat_prompt_ids, read_rollouts

    out = tmp_path / "remote"
    cmd = ["rollouts", "--server", server.base_url, "--prompts", "bench/prompts-dev.jsonl",
           "--limit", "2", "--n", "3", "--max-tokens", "8", "--reward", "relevance",
           "--cost", "profanity", "--out", str(out)]
    p = alignserve(*cmd, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest, rows = read_rollouts(out)
    assert manifest.extra["server"] == server.base_url and manifest.count == len(rows) == 6
    tok = AutoTokenizer.from_pretrained(embedded_model_dir(Settings().home))
    for row in rows:
        assert row.prompt_ids == chat_prompt_ids(tok, row.prompt)
        assert 1 <= len(row.token_ids) <= 8 and len(row.logprobs) == len(row.token_ids)
        assert all(lp <= 0 and math.isfinite(lp) for lp in row.logprobs)
        assert tok.decode(row.token_ids, skip_special_tokens=True) == row.text
        assert -1 <= row.reward <= 1 and 0 <= row.cost <= 1
    p = alignserve(*cmd, timeout=120)
    assert p.returncode == 0 and "nothing to do" in p.stdout
