"""`alignserve finetune rdro` end to end on the embedded SmolLM2 model (CPU, float32, a few
steps): a servable merged checkpoint, the report's RDRO statistics, and KL(π_θ‖π_ref) on held-out
prompts through training (report.json `kl`, report.md's section, kl_curve.png). No engine is
started: training and the KL samples run in plain torch."""

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
# small on purpose (the suite's time budget): 10 pairs, 3 steps of 2 + 2 answers; KL on 2
# held-out prompts × 2 answers of ≤ 16 tokens
ARGS = ["--limit", "10", "--held-out", "0.2", "--steps", "3", "--max-length", "64", "--seed", "0",
        "--batch-size", "4", "--kl-every", "2", "--kl-prompts", "2", "--kl-samples", "2",
        "--kl-tokens", "16"]


@pytest.fixture(scope="module")
def rdro_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("rdro") / "checkpoint"
    proc = subprocess.run(
        [ALIGNSERVE, "finetune", "rdro", "--data",
         str(ROOT / "finetune" / "data" / "synthetic_safety.jsonl"), "--out", str(out), *ARGS],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"finetune rdro failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return out, proc


def test_rdro_checkpoint_is_servable_and_changed(rdro_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, _ = rdro_run
    base_dir = embedded_model_dir(Settings().home)
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(folder / "model.safetensors")
    assert tuned.keys() == base.keys() and not (folder / "adapter_config.json").exists()
    changed = [k for k in base if not (tuned[k] == base[k]).all()]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert AutoConfig.from_pretrained(folder).architectures == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()


def test_rdro_report(rdro_run):
    folder, _ = rdro_run
    report = json.loads((folder / "report.json").read_text())
    before, after = report["before"]["train"], report["after"]["train"]
    assert report["method"] == "rdro" and report["config"]["alpha"] == 0.5
    assert report["beta"]["value"] == 1.0
    assert before["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)  # policy = reference
    assert after["loss"] < before["loss"]
    assert after["chosen_reward"] > after["rejected_reward"]
    # 1/α bounds the optimum; an early iterate may pass it (finetune/rdro.py), so only recorded
    assert after["ratio_bound"] == 2.0 and math.isfinite(after["ratio_max"])
    assert before["ratio_max"] == pytest.approx(1.0)
    assert report["steps"] == len(report["loss_curve"]) == 3


def test_rdro_report_tracks_kl_on_held_out_prompts(rdro_run):
    folder, proc = rdro_run
    kl = json.loads((folder / "report.json").read_text())["kl"]
    assert kl["prompts_source"] == "held_out" and kl["config"]["every"] == 2
    steps = [e["step"] for e in kl["entries"]]
    assert steps[0] == 0 and steps[-1] == 3 and steps == sorted(set(steps))
    assert kl["entries"][0]["kl"] == 0.0
    last = kl["entries"][-1]
    assert last["answers"] == 4 and last["prompts"] == 2 and 1 <= last["tokens_mean"] <= 16
    assert math.isfinite(last["kl"]) and last["ci95"][0] <= last["kl"] <= last["ci95"][1]
    assert kl["thresholds"] == {"inspect": 15.0, "useless": 100.0}
    assert "## KL(π_θ‖π_ref) through training" in (folder / "report.md").read_text()
    assert (folder / "kl_curve.png").stat().st_size > 0
    assert "KL(π_θ‖π_ref) on held-out prompts at step 3" in proc.stdout
