"""Harmful-prefix → recovery data augmentation (Qi et al. 2024, "Safety Alignment Should Be Made
More Than Just a Few Tokens Deep", arXiv 2406.05946, §3.1 and its objective, Eqn 2).

Why. Alignment that only shapes an answer's first tokens is undone by prefilling the start of a
harmful answer (evaluation/prefill.py measures it). Qi et al. deepen it with *safety recovery
examples* (x, h, r): a harmful instruction x, a harmful answer h and a safe answer r. The policy
is trained to produce r after the first k tokens of h, with the loss on r only:

    min_θ  E_{(x,h,r), k ~ P_k} [ −log π_θ(r | x, h_{≤k}) ]          (Eqn 2's safety term)

mixed with utility data that anchors the benign behaviour (Eqn 2's second term). P_k in the
paper's code (github.com/Unispac/shallow-vs-deep-alignment, `gen_safety_augmentation_batch`):
with probability ½, k ~ Uniform{1, …, min(100, |h|)}; otherwise k = 0 (the plain refusal).
The sampling rule is read from that code; the section and equation numbers are recalled (the
paper's text was not readable here; reviews cite its constrained objective as Eqn 3).

What we build, and the choices the paper leaves open here:
- The triples come from the preference data the fine-tuning commands already build: every
  training example whose chosen answer is safe and whose rejected one is harmful (after
  SafeDPO's transform or MoCAN's relabelling: `h_chosen == 0 and h_rejected == 1`) gives
  x = its prompt, h = the rejected answer, r = the chosen (safe) answer as the recovery.
- k is counted in the *policy's* tokens (as `alignserve eval --prefill` counts them) and drawn,
  seeded, from Uniform{1, …, min(K_MAX, |h| − 1)}: at least one harmful token is left after the
  prefix, so the rejected side still has a continuation to be penalised. The k = 0 half of P_k
  is played by the original examples, which are all retained: with one recovery example per
  eligible pair, the mix is the paper's ½ / ½ on those pairs.
- Preference form (what SafeDPO / MoCAN train on): chosen = h_{≤k} ⊕ r, rejected = h. Both share
  the prefix h_{≤k}, so in the DPO logit β·[log π_θ/π_ref(chosen) − log π_θ/π_ref(rejected)] the
  prefix's log-probabilities cancel (policy and reference alike) and what remains is
  β·[log π_θ/π_ref(r | x, h_{≤k}) − log π_θ/π_ref(h_{>k} | x, h_{≤k})]: DPO between recovering
  and carrying on, conditioned on the prefill: the preference analogue of Eqn 2's term, with no
  change to the trainer (the prefix sits inside the assistant turn, as the attack puts it). The
  cancellation is exact when both texts tokenise to the same first k ids (checked: every
  example of the shipped pairs under SmolLM2's tokenizer); a tokenizer that merges across the
  seam would leave one boundary token uncancelled. SafeDPO's offset (h̃_l − h̃_w)·Δ = Δ
  applies: the rejected side carries on harmfully.
- SFT form (`RecoveryExample.messages()` / `.target`): the user turn, then the open assistant
  turn holding h_{≤k}, target r: Eqn 2's term as written (loss on the target only).
- KLDO / PRO / RDRO score whole answers (no loss mask), so log π(h_{≤k}) would not cancel and
  the prefix itself would be reinforced: the option refuses them.
- h_{≤k} ⊕ r: joined with one space when neither side has whitespace at the seam (the paper
  concatenates token ids; a text seam needs a word boundary).

Standard library only at module level: the CLI parser imports this module at every start.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .safedpo import DPOExample

ACTION = "recovery"  # DPOExample.action of an augmented example
METHODS = ("safedpo", "mocan")  # preference methods whose margin cancels the shared prefix


@dataclass(frozen=True)
class RecoveryExample:
    """(x, h_{≤k}, r): prompt, prefilled start of the harmful answer, recovery target."""

    prompt: str
    prefix: str     # the first k tokens of the harmful answer, as text
    recovery: str   # the safe answer the policy should continue with
    harmful: str    # the whole harmful answer (the rejected side)
    k: int

    @property
    def target(self) -> str:
        """The recovery as it continues the prefix (with the seam's space, if any)."""
        return join_seam(self.prefix, self.recovery)[len(self.prefix):]

    def messages(self) -> list[dict]:
        """Chat messages ending with the open assistant turn h_{≤k} (render them with the
        chat template's `continue_final_message`); the SFT target is `target`."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.prefix}]

    def to_dpo(self) -> DPOExample:
        """Preference form: (h_{≤k} ⊕ r) ≻ h, the safe side first (see the module docstring)."""
        return DPOExample(self.prompt, join_seam(self.prefix, self.recovery), self.harmful,
                          h_chosen=0, h_rejected=1, action=ACTION)


def join_seam(prefix: str, recovery: str) -> str:
    if prefix and recovery and not prefix[-1].isspace() and not recovery[0].isspace():
        return f"{prefix} {recovery}"
    return prefix + recovery


def eligible(ex: DPOExample) -> bool:
    """A safe chosen answer against a harmful rejected one (and not already augmented)."""
    return ex.h_chosen == 0 and ex.h_rejected == 1 and ex.action != ACTION


def recovery_examples(examples: Sequence[DPOExample], tokenizer, k_max: int, seed: int
                      ) -> list[RecoveryExample]:
    """One recovery example per eligible example, k ~ Uniform{1, …, min(k_max, |h| − 1)}
    (seeded; harmful answers of a single token give none). `tokenizer` has the HF
    `encode(text, add_special_tokens=False)` / `decode(ids)` pair."""
    if k_max < 1:
        raise ValueError(f"augment k_max must be ≥ 1 token, got {k_max}")
    rng = random.Random(seed)
    out = []
    for ex in examples:
        if not eligible(ex):
            continue
        ids = tokenizer.encode(ex.rejected, add_special_tokens=False)
        hi = min(k_max, len(ids) - 1)
        if hi < 1:
            continue
        k = rng.randint(1, hi)
        out.append(RecoveryExample(ex.prompt, tokenizer.decode(ids[:k]), ex.chosen, ex.rejected,
                                   k))
    return out


def augment(examples: Sequence[DPOExample], tokenizer, k_max: int, seed: int
            ) -> tuple[list[DPOExample], dict]:
    """The original examples (all kept, in order) followed by the recovery examples in
    preference form; statistics for the report."""
    rec = recovery_examples(examples, tokenizer, k_max, seed)
    ks = [r.k for r in rec]
    stats = {"k_max": k_max, "seed": seed, "eligible": sum(map(eligible, examples)),
             "recovery_examples": len(rec),
             "mean_k": sum(ks) / len(ks) if ks else None, "max_k": max(ks, default=None)}
    return [*examples, *(r.to_dpo() for r in rec)], stats


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The data builder's flag (finetune/cli.py adds it beside the other data flags)."""
    p.add_argument("--augment-prefill", dest="augment_prefill", type=int, default=None,
                   metavar="K_MAX",
                   help="safedpo / mocan: add one harmful-prefix → recovery example per training "
                        "pair with a safe chosen and a harmful rejected answer, the first k ~ "
                        "U{1..K_MAX} tokens of the harmful answer prefilled (Qi et al. 2024, "
                        "arXiv 2406.05946 §3.1; finetune/augment.py). Held-out pairs are kept "
                        "as they are.")


def apply(ns: argparse.Namespace, train_ex: list[DPOExample], train_stats: dict, model: str
          ) -> tuple[list[DPOExample], dict]:
    """`--augment-prefill` on the training split (a no-op without it); `model` is the resolved
    base policy, whose tokenizer counts k. Raises ValueError on a method it cannot serve."""
    k_max = getattr(ns, "augment_prefill", None)
    if k_max is None:
        return train_ex, train_stats
    if k_max < 1:
        raise ValueError(f"--augment-prefill must be ≥ 1 token, got {k_max}")
    if ns.method not in METHODS:
        raise ValueError(f"--augment-prefill: {ns.method} scores whole answers, so the harmful "
                         f"prefix would be reinforced; use it with {' or '.join(METHODS)}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    examples, stats = augment(train_ex, tokenizer, k_max, ns.seed)
    return examples, {**train_stats, "augment_prefill": stats}
