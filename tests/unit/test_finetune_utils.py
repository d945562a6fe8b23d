"""finetune/utils.py: the helpers the training recipes share (issue 30 item 7)."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

from finetune.utils import (
    answer_batch,
    ensure_pad_token,
    lora_config,
    pick_indices,
    readable_by_umask,
    right_pad,
)


def test_right_pad_left_aligns_rows_and_masks_the_fill():
    out, mask = right_pad([[5, 6, 7], [8]], fill=-1)
    assert out.tolist() == [[5, 6, 7], [8, -1, -1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out.dtype == mask.dtype == torch.long
    wide, _ = right_pad([[1]], fill=0, width=3)
    assert wide.tolist() == [[1, 0, 0]]


def test_answer_batch_scores_only_the_answer_tokens():
    ids, attn, answer = answer_batch([([1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8], 5)], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    # from the prompt's end to the row's end; a prompt longer than the row leaves no answer
    assert answer.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_ensure_pad_token_falls_back_to_end_of_sequence():
    class Tok:
        pad_token, eos_token = None, "</s>"

        @property
        def pad_token_id(self):
            return {"</s>": 2, "<pad>": 1}[self.pad_token]

    tok = Tok()
    assert ensure_pad_token(tok) == 2 and tok.pad_token == "</s>"
    tok.pad_token = "<pad>"
    assert ensure_pad_token(tok) == 1  # an existing pad token is kept


def test_lora_config_takes_rank_alpha_and_targets():
    pytest.importorskip("peft")
    cfg = lora_config(SimpleNamespace(lora_r=4, lora_alpha=8))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.0)
    assert cfg.target_modules == "all-linear"
    listed = lora_config(SimpleNamespace(lora_r=2, lora_alpha=4), target_modules=["q_proj"])
    assert set(listed.target_modules) == {"q_proj"}


def test_readable_by_umask_gives_saved_files_the_umask_mode(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)  # as a private temp file leaves it
    old = os.umask(0o022)
    try:
        readable_by_umask(tmp_path)
    finally:
        os.umask(old)
    assert weights.stat().st_mode & 0o777 == 0o644


def test_pick_indices_is_distinct_when_it_can_be_and_fills_up_otherwise():
    rng = random.Random(0)
    got = pick_indices(rng, [1, 2, 3, 4], 3)
    assert len(set(got)) == 3 and set(got) <= {1, 2, 3, 4}
    more = pick_indices(rng, [7, 9], 5)
    assert more[:2] == [7, 9] and len(more) == 5 and set(more) == {7, 9}


def test_pick_balanced_draws_both_labels_every_batch():
    from finetune.utils import pick_balanced

    rng = random.Random(0)
    for batch in (1, 2, 5, 8):
        idx = pick_balanced(rng, [0, 1, 2], [10, 11], batch)
        half = max(1, (batch + 1) // 2)
        assert len(idx) == 2 * half
        assert all(i < 10 for i in idx[:half]) and all(i >= 10 for i in idx[half:])
