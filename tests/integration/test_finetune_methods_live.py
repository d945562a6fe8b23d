"""`alignserve finetune kldo` and `alignserve finetune pro` end to end on the embedded SmolLM2
model (CPU, float32, a few steps), and `alignserve eval --separation-only` on the base model and
the KLDO checkpoint. No engine is started: training and hidden states run in plain torch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.model_prep import embedded_model_dir
from server.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALIGNSERVE = str(Path(sys.executable).parent / "alignserve")
# small on purpose (the suite's time budget): 10 pairs, 3 steps of 2 pairs / 4 answers
ARGS = ["--limit", "10", "--held-out", "0.2", "--steps", "3", "--max-length", "64", "--seed", "0"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([ALIGNSERVE, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:2]} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def _finetune(tmp_path_factory, method: str, *flags: str) -> Path:
    out = tmp_path_factory.mktemp(method) / "checkpoint"
    _run("finetune", method, "--data", str(ROOT / "finetune" / "data" / "synthetic_safety.jsonl"),
         "--out", str(out), *flags, *ARGS)
    return out


@pytest.fixture(scope="module")
def kldo_checkpoint(tmp_path_factory) -> Path:
    return _finetune(tmp_path_factory, "kldo", "--batch-size", "4")


@pytest.fixture(scope="module")
def pro_checkpoint(tmp_path_factory) -> Path:
    return _finetune(tmp_path_factory, "pro", "--feedback", "binary", "--batch-size", "4")


def _assert_merged_and_changed(folder: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(embedded_model_dir(Settings().home) / "model.safetensors")
    tuned = load_file(folder / "model.safetensors")
    assert tuned.keys() == base.keys() and not (folder / "adapter_config.json").exists()
    changed = [k for k in base if not (tuned[k] == base[k]).all()]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()


def test_kldo_checkpoint_and_report(kldo_checkpoint):
    _assert_merged_and_changed(kldo_checkpoint)
    report = json.loads((kldo_checkpoint / "report.json").read_text())
    before, after = report["before"]["train"], report["after"]["train"]
    assert before["loss"] == 0.0  # policy = reference: no divergence yet
    assert after["loss"] < 0 and after["kl_estimate"] > 0  # D⁺ and D⁻ pulled apart
    assert after["chosen_reward"] > after["rejected_reward"]
    assert report["steps"] == len(report["loss_curve"]) == 3
    assert (kldo_checkpoint / "loss_curve.png").stat().st_size > 0


def test_pro_checkpoint_and_report(pro_checkpoint):
    _assert_merged_and_changed(pro_checkpoint)
    report = json.loads((pro_checkpoint / "report.json").read_text())
    before, after = report["before"]["train"], report["after"]["train"]
    assert before["loss"] == pytest.approx(0.0, abs=1e-9) and after["loss"] < before["loss"]
    assert after["reward_margin"] > 0 and after["accuracy"] > 0.5
    assert report["method"] == "pro (binary)" and report["config"]["alpha"] == 2.0


def test_eval_separation_of_base_and_kldo(kldo_checkpoint, tmp_path):
    rows = [json.loads(line) for line in (ROOT / "bench" / "prompts-dev.jsonl").read_text()
            .splitlines() if line.strip()]
    prompts = tmp_path / "prompts.jsonl"  # 6 + 6 of the dev prompts
    prompts.write_text("".join(json.dumps(r) + "\n" for kind in ("helpful", "adversarial")
                               for r in [r for r in rows if r["kind"] == kind][:6]))
    out = tmp_path / "eval"
    proc = _run("eval", "--prompts", str(prompts), "--out", str(out),
                "--separation-only", "--separation", f"embedded,{kldo_checkpoint}")
    assert "Bhattacharyya distance" in proc.stdout
    doc = json.loads((out / "separation.json").read_text())
    base, tuned = doc["separation"]
    assert (base["policy"], base["safe_prompts"], base["harmful_prompts"]) == ("embedded", 6, 6)
    for r in (base, tuned):
        assert math.isfinite(r["bhattacharyya_distance"]) and r["bhattacharyya_distance"] >= 0
        assert -1 <= r["silhouette"] <= 1
    assert (out / "separation.png").stat().st_size > 0
