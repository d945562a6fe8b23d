"""Real scorers, including a Hugging Face sequence-classification reward model built here."""

from __future__ import annotations

import shutil

import pytest

from runtime.model_prep import embedded_model_dir
from runtime.scorers import (
    HFRewardScorer,
    LengthScorer,
    ProfanityScorer,
    RelevanceScorer,
    SentimentScorer,
)
from runtime.settings import EngineSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A 1-layer Llama classifier with the policy's tokenizer (random weights, fixed seed)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    src = embedded_model_dir(EngineSettings().home)
    out = tmp_path_factory.mktemp("tiny-rm")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      num_labels=1, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy(src / "chat_template.jinja", out / "chat_template.jinja")
    return out


def test_real_scorers_behave():
    prompt = "How do I bake bread?"
    rel = RelevanceScorer().score(prompt, ["Mix flour, water and yeast, then bake it.",
                                           "The stock market fell today."])
    assert rel[0] > rel[1]
    prof = ProfanityScorer().score(prompt, ["Have a lovely day.", "you are a fucking idiot"])
    assert prof[0] < 0.5 < prof[1]
    sent = SentimentScorer().score(prompt, ["I love this, wonderful!", "This is awful and sad."])
    assert sent[0] > 0 > sent[1]
    assert LengthScorer(target=4).score(prompt, ["a b c d", "a"]) == [0.0, -0.75]


def test_hf_reward_model_scores_in_batches(tiny_reward_model):
    rm = HFRewardScorer(str(tiny_reward_model), batch_size=2)
    texts = ["short", "a somewhat longer answer", "third", "fourth one here", "fifth"]
    batched = rm.score("question", texts)
    single = [rm.score("question", [t])[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-4)  # padding does not change scores
    assert len(set(round(x, 6) for x in batched)) > 1


def test_a_request_cannot_load_a_reward_model(client, model_name, tiny_reward_model):
    """The session server was not started with --scorer hf:...: naming one is a generic 400
    that loads nothing and does not say whether the path exists (docs/security.md). A server
    started with --scorer serves it: test_remote_scorer_live compares it with the remote RM."""
    import openai

    msgs = [{"role": "user", "content": "Name a fruit."}]
    for name in (f"hf:{tiny_reward_model}", "hf:/no/such/folder"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(
                model=model_name, messages=msgs, max_tokens=12,
                extra_body={"alignment": {"strategy": "best_of_n", "n": 4, "reward": name}})
        assert exc.value.body["code"] == "unknown_scorer"
        assert str(tiny_reward_model) not in exc.value.body["message"]
        assert "no/such" not in exc.value.body["message"]
    local = HFRewardScorer(str(tiny_reward_model)).score("Name a fruit.", ["An apple."])
    assert len(local) == 1  # the model itself loads fine in-process
