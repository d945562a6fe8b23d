"""`alignserve finetune bond` end to end on the embedded SmolLM2 model (CPU, float32), few steps.

No engine: the rollout folder is written here with the embedded tokenizer (chat prompt ids as
the rollouts tool builds them, answers encoded + end-of-sequence), reward `length` (no model to
load), so the test costs the training only: 2 steps of BOND with both Jeffreys terms, i.e. the
forward term on the stored samples and the backward term on fresh samples scored by the
registry's `length` scorer. The checkpoint must pass the server's hot-swap compatibility check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.model_prep import embedded_model_dir
from server.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ["Yes.", "Drink water and rest well tonight.", "Sleep at the same time each day, "
           "keep the room dark and cool, and avoid screens late.", "No idea."]


def _rollouts(folder: Path, base: Path) -> None:
    from transformers import AutoTokenizer

    from runtime.scorers import LengthScorer
    from valuenet.data import Manifest, Rollout, append_rollouts, write_manifest
    from valuenet.rollouts import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(base)
    score = LengthScorer()  # target 64, as the trainer's registry builds it
    write_manifest(folder, Manifest(model="embedded", prompts="inline", n=len(ANSWERS),
                                    max_tokens=12, temperature=1.0, reward="length",
                                    extra={"model_path": str(base)}))
    for i, prompt in enumerate(["How can I sleep better?", "Give me a tip for a calm evening.",
                                "What helps against a headache?"]):
        rewards = score.score(prompt, ANSWERS)
        append_rollouts(folder, [
            Rollout(prompt_id=f"p{i}", prompt=prompt, prompt_ids=chat_prompt_ids(tok, prompt),
                    sample=k, token_ids=tok.encode(a, add_special_tokens=False)
                    + [tok.eos_token_id], logprobs=[-1.0], text=a, finish_reason="stop",
                    reward=float(r))
            for k, (a, r) in enumerate(zip(ANSWERS, rewards))])


def test_finetune_bond_writes_a_hot_swappable_checkpoint(tmp_path):
    from server.policy.checkpoints import check_compatible, inspect

    base = embedded_model_dir(Settings().home)
    folder = tmp_path / "rollouts"
    _rollouts(folder, base)
    out = tmp_path / "bond"
    cmd = [str(Path(sys.executable).parent / "alignserve"), "finetune", "bond", "--rollouts",
           str(folder), "--out", str(out), "--n", "4", "--steps", "2", "--batch-prompts", "2",
           "--policy-samples", "2", "--held-out", "0.34", "--max-length", "96", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (out / "adapter_config.json").exists()  # merged
    check_compatible(inspect(base), inspect(out))     # what /admin/policies checks
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "bond" and report["config"]["n"] == 4
    assert report["config"]["max_new_tokens"] == 12  # the rollouts' max_tokens
    assert [e["step"] for e in report["log"]] == [1, 2]
    assert all(e["reward"] <= 0 and 0 < e["quantile"] <= 1 for e in report["log"])  # length ≤ 0
    assert set(report["after"]) == {"train", "held_out"}
    for name in ("report.md", "loss_curve.png"):
        assert (out / name).stat().st_size > 0
