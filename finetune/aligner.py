"""Aligner corrector training: SFT of a LoRA adapter on (question, answer, correction) triples.

Ji et al., "Aligner: Efficient Alignment by Learning to Correct", arXiv 2402.02416. The
corrector μ_φ is a conditional seq2seq model trained by maximum likelihood on a dataset
M = {(x, y_o, y_c)} of queries, original answers and corrected answers:

    L(φ) = − E_{(x, y_o, y_c) ∼ M} [ log μ_φ(y_c | y_o, x) ]

i.e. next-token cross-entropy on the correction tokens only; the prompt (template, question
and original answer) is context and carries no loss. What we could and could not read: the
paper pages available to us describe the objective in words ("a conditional seq2seq model
... trained to optimise the upper bound of the SFT objective", "a warm-up step to learn the
identity mapping, followed by residual Q-A-C learning"); the displayed equation itself and
the PKU-Alignment/aligner training code were not in the searchable index. The formula above is
the conditional negative log-likelihood those words describe, not a transcription. The paper's
identity warm-up (Q-A-A: the correction equals the answer) is represented in our data by the
"identity" rows (good answers kept as they are), mixed into training rather than run as a
separate first phase.

Prompt: the reference Aligner template (`decoding.aligner.TEMPLATE`), tokenised exactly as the
`aligner` strategy tokenises it at serving time (`encode_prompt`), then " " + correction + EOS.
The prompt and the target are tokenised separately, so the trained boundary is the one the
served corrector continues from.

Output: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), which
the server registers through /admin/policies (`--enable-lora true`) and requests name as
`alignment.corrector`; plus report.json / report.md next to it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from decoding.aligner import encode_prompt

from .utils import load_policy, readable_by_umask, right_pad

EVAL_LIMIT = 16  # examples per split in the report's before/after NLL (a forward pass each)
IGNORE = -100  # label of a position that carries no loss (torch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Triple:
    question: str
    answer: str      # the upstream model's original answer y_o
    correction: str  # the corrected answer y_c (equal to `answer` for identity rows)


class TripleSchemaError(ValueError):
    pass


def load_triples(path: str | Path, limit: int | None = None) -> list[Triple]:
    """Rows {"question", "answer", "correction"} (strings, non-empty question and correction)
    from a .jsonl file; a ValueError naming the line for anything else."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TripleSchemaError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("question", "answer", "correction")):
            raise TripleSchemaError(f"{path}:{n}: needs string fields question, answer, correction")
        if not row["question"].strip() or not row["correction"].strip():
            raise TripleSchemaError(f"{path}:{n}: empty question or correction")
        out.append(Triple(row["question"], row["answer"], row["correction"]))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TripleSchemaError(f"{path}: no triples")
    return out


def split_triples(triples: list[Triple], held_out: float, seed: int
                  ) -> tuple[list[Triple], list[Triple]]:
    """A seeded split by question, so no held-out question was seen in training."""
    questions = sorted({t.question for t in triples})
    random.Random(seed).shuffle(questions)
    k = round(len(questions) * held_out)
    if held_out > 0 and len(questions) > 1:
        k = min(max(k, 1), len(questions) - 1)
    out = set(questions[:k])
    return [t for t in triples if t.question not in out], [t for t in triples if t.question in out]


def build_example(tokenizer, triple: Triple, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are IGNORE over the prompt and the ids over the correction
    (+ EOS), so the loss is −log μ(y_c | y_o, x) only. Too long: the correction's tail is cut
    (it then has no EOS); a prompt that leaves no correction token is a ValueError."""
    prompt = encode_prompt(tokenizer, triple.question, triple.answer)
    target = list(tokenizer.encode(" " + triple.correction.strip(), add_special_tokens=False))
    target.append(tokenizer.eos_token_id)
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for the correction "
                         f"(max_length {max_length}); raise --max-length")
    target = target[:room]
    return prompt + target, [IGNORE] * len(prompt) + target


def masked_nll(logits, labels):
    """Mean −log p of the labelled tokens. logits [B, T, V] predict position t+1 from t, so
    logits[:, :-1] are scored against labels[:, 1:]; IGNORE positions add nothing. Returns
    (mean loss, number of labelled tokens)."""
    import torch.nn.functional as F

    pred = logits[:, :-1].float()
    gold = labels[:, 1:]
    count = (gold != IGNORE).sum()
    total = F.cross_entropy(pred.reshape(-1, pred.size(-1)), gold.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total / count.clamp(min=1), int(count)


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids / attention_mask / labels tensors [B, T] (labels padded IGNORE)."""
    ids, mask = right_pad([x for x, _ in examples], pad_id)
    labels, _ = right_pad([y for _, y in examples], IGNORE, width=ids.shape[1])
    return ids, mask, labels


@dataclass
class AlignerConfig:
    model: Path | str
    out: Path
    steps: int = 40
    lr: float = 3e-4
    batch_size: int = 8
    max_length: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    progress: bool = True
    lora = True  # not a field: the corrector is always an adapter (load_policy reads it)


@dataclass
class AlignerResult:
    loss_curve: list[tuple[int, float]]
    before: dict[str, dict] = field(default_factory=dict)  # split -> {"loss", "tokens"}
    after: dict[str, dict] = field(default_factory=dict)
    train_s: float = 0.0
    trainable_params: int = 0


def evaluate(model, examples, pad_id: int, batch_size: int = 16) -> dict:
    """Token-weighted mean correction NLL over a split (and its perplexity)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, mask, labels = collate(examples[i:i + batch_size], pad_id)
            loss, n = masked_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
            total, count = total + float(loss) * n, count + n
    model.train()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def train(cfg: AlignerConfig, train_triples: list[Triple], eval_triples: list[Triple]
          ) -> AlignerResult:
    """LoRA SFT of the corrector; saves the adapter to `cfg.out`."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    # attention and MLP projections, as `finetune --save-adapter` adapts them (vLLM serves both)
    tokenizer, model = load_policy(cfg, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pad_id = tokenizer.pad_token_id
    splits = {"train": [build_example(tokenizer, t, cfg.max_length) for t in train_triples]}
    if eval_triples:
        splits["held_out"] = [build_example(tokenizer, t, cfg.max_length) for t in eval_triples]
    result = AlignerResult([], trainable_params=sum(
        p.numel() for p in model.parameters() if p.requires_grad))
    # the report's before/after NLL reads at most EVAL_LIMIT examples per split (CPU time)
    splits_eval = {k: v[:EVAL_LIMIT] for k, v in splits.items()}
    result.before = {k: evaluate(model, v, pad_id) for k, v in splits_eval.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="finetune aligner", unit="step",
               disable=not cfg.progress)
    for step in bar:
        if len(order) < cfg.batch_size:  # reshuffled epochs, drawn batch by batch
            order += rng.sample(range(len(splits["train"])), len(splits["train"]))
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        ids, mask, labels = collate([splits["train"][i] for i in batch], pad_id)
        loss, _ = masked_nll(model(input_ids=ids, attention_mask=mask).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        result.loss_curve.append((step, value))
        bar.set_postfix(loss=f"{value:.3f}")
    result.train_s = time.perf_counter() - t0
    result.after = {k: evaluate(model, v, pad_id) for k, v in splits_eval.items()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(cfg.out), safe_serialization=True)
    readable_by_umask(cfg.out)  # a server running as another user loads the adapter
    return result


def write_report(out: Path, report: dict) -> None:
    """report.json and a short report.md (correction NLL before/after per split)."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["# alignserve finetune aligner", "",
             f"- base model: `{report['config']['model']}`",
             f"- output: `{report['output']}` (LoRA adapter: register it, then request "
             "`alignment.corrector`)",
             f"- data: `{report['data']['source']}`, {report['data']['triples']} triples "
             f"({report['data']['train']} train, {report['data']['held_out']} held out)",
             f"- steps: {report['steps']}, training {report['train_s']:.1f} s, "
             f"{report['trainable_params']:,} trainable parameters", "",
             "| split | correction NLL before | after | perplexity after |", "|---|---|---|---|"]
    for split, before in report["before"].items():
        after = report["after"][split]
        lines.append(f"| {split} | {before['loss']:.4f} | {after['loss']:.4f} | "
                     f"{after['perplexity']:.3f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
