"""`alignserve finetune safedpo` end to end on the embedded SmolLM2 model (CPU, float32).

The `safedpo_checkpoint` fixture (conftest.py) runs the CLI once; here we check that the folder
is a servable checkpoint of the same architecture and vocabulary, that training changed the
weights, and that the report says the loss on the training pairs went down.
"""

from __future__ import annotations

import json

import pytest

from runtime.model_prep import embedded_model_dir
from runtime.settings import EngineSettings

pytestmark = pytest.mark.integration


def test_checkpoint_loads_with_the_base_architecture(safedpo_checkpoint):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base_dir = embedded_model_dir(EngineSettings().home)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (safedpo_checkpoint / name).is_file(), name
    assert not (safedpo_checkpoint / "adapter_config.json").exists()  # merged, not an adapter
    cfg, base_cfg = AutoConfig.from_pretrained(safedpo_checkpoint), AutoConfig.from_pretrained(base_dir)
    assert cfg.architectures == base_cfg.architectures == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(base_cfg, key), key
    assert len(AutoTokenizer.from_pretrained(safedpo_checkpoint)) == len(
        AutoTokenizer.from_pretrained(base_dir))

    tuned = AutoModelForCausalLM.from_pretrained(safedpo_checkpoint, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    assert tuned_sd.keys() == base_sd.keys()  # no LoRA leftovers
    changed = [k for k in base_sd if not torch.equal(tuned_sd[k], base_sd[k])]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert all(torch.isfinite(v).all() for v in tuned_sd.values())


def test_report_shows_the_training_loss_went_down(safedpo_checkpoint):
    report = json.loads((safedpo_checkpoint / "report.json").read_text())
    for name in ("report.md", "loss_curve.png"):
        assert (safedpo_checkpoint / name).stat().st_size > 0
    before, after = report["before"]["train"], report["after"]["train"]
    assert after["loss"] < before["loss"]
    assert after["reward_margin"] > 0 and after["accuracy"] > 0.5
    assert report["data"]["train"]["swap"] + report["data"]["held_out"].get("swap", 0) > 0
    assert "held_out" in report["after"] and report["steps"] == len(report["loss_curve"])
    assert report["steps_per_s"] > 0
