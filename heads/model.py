"""Prefix value model: a causal-LM backbone's final hidden states + a value head; checkpoints.

One forward pass of the backbone over x + y gives the hidden state hᵢ at every position, hence
values at every prefix (Mudgal et al. 2024, arXiv 2310.17022):

- CD-FUDGE head (FUDGE, Yang & Klein 2021, as a regressor): V(x, s≤i) = w·hᵢ + b.
- CD-Q head, vocabulary-sized: Q(x, s≤i, z) = s(hᵢ) + W_z·hᵢ + b_z for every next token z.
  The shared term s(hᵢ) is our parameterisation choice: the token part starts at zero and only
  tokens seen in the rollouts move their row W_z, so an unseen token gets the prefix's value
  s(hᵢ) instead of a constant (rollouts cover a tiny part of a 49k vocabulary).

Both heads start at zero, i.e. at the mean training reward (rewards are normalised), so the
initial validation loss of CD-FUDGE is the "predict the mean" baseline.

Checkpoint folder (`save_checkpoint` / `load_checkpoint`):
    config.json        HeadConfig: format/version, method, backbone and reference paths, sizes,
                       reward_mean / reward_std (values are trained on (r − mean)/std; scorers
                       undo it), lora flag, the rollouts' sampling temperature and top_p (the
                       values are those of that sampling distribution), value_range (the
                       training targets' range in reward units: scorers clip to it), training
                       config
    head.safetensors   the head: state.weight [1, H], state.bias [1] (+ token.weight [V, H],
                       token.bias [V] for CD-Q)
    adapter/           LoRA adapter (peft save_pretrained), only when the backbone was tuned
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

METHODS = ("fudge", "cdq")
FORMAT = "alignserve-value-head"
CONFIG = "config.json"
HEAD = "head.safetensors"
ADAPTER = "adapter"


class ValueHead(nn.Module):
    """Linear value head on backbone hidden states [..., H] (see the module docstring)."""

    def __init__(self, method: str, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.state = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.state.weight)
        nn.init.zeros_(self.state.bias)
        self.token: nn.Linear | None = None
        if method == "cdq":
            self.token = nn.Linear(hidden_size, vocab_size)
            nn.init.zeros_(self.token.weight)
            nn.init.zeros_(self.token.bias)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """FUDGE V(prefix) for hidden states h [..., H] → [...]."""
        return self.state(h).squeeze(-1)

    def q(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """CD-Q values of chosen next tokens: h [..., H], tokens [..., K] → [..., K].
        Gathers K rows of the token head instead of a full [..., V] product (V = 49k on CPU)."""
        assert self.token is not None, "q() needs a CD-Q head"
        if self.token.out_features <= 32 * tokens.shape[-1]:  # small vocabulary: one product
            return self.q_all(h).gather(-1, tokens)
        w = nn.functional.embedding(tokens, self.token.weight)  # [..., K, H]
        b = nn.functional.embedding(tokens, self.token.bias[:, None]).squeeze(-1)  # [..., K]
        # elementwise product + sum: many tiny batched matmuls are far slower on CPU
        return self.state(h) + (w * h.unsqueeze(-2)).sum(-1) + b

    def q_all(self, h: torch.Tensor) -> torch.Tensor:
        """CD-Q values of every next token: h [..., H] → [..., V]."""
        assert self.token is not None, "q_all() needs a CD-Q head"
        return self.state(h) + self.token(h)


@dataclass
class HeadConfig:
    method: str
    backbone: str  # folder or HF id of the backbone
    reference: str  # folder or HF id of the reference policy π_ref (CD-Q targets, V(x) at t=0)
    hidden_size: int
    vocab_size: int
    reward_mean: float = 0.0
    reward_std: float = 1.0
    lora: bool = False
    # The sampling distribution of the rollouts the values were fitted on (V is the value of
    # continuing with it); None in checkpoints that predate these fields (see `sampling`).
    temperature: float | None = None
    top_p: float | None = None
    # [lo, hi]: the range of the training targets in reward units (the rewards, or with
    # target "advantage" r − the prompt's mean, plus the mean). Every scorer clips the head's
    # outputs to it, which certifies the range R = hi − lo that tokenwise CD's KL bound needs
    # (min(λR, λ²R²/8) per step: decoding/kl.py). None in checkpoints that predate it: no
    # clipping, and no bound.
    value_range: list[float] | None = None
    format: str = FORMAT
    version: int = 1
    train: dict = field(default_factory=dict)

    def sampling(self) -> tuple[float | None, float | None]:
        """(temperature, top_p) the values were trained at. Older checkpoints kept only the
        temperature, in the training config; their rollouts always sampled at top_p = 1."""
        if self.temperature is not None:
            return self.temperature, self.top_p if self.top_p is not None else 1.0
        old = self.train.get("temperature")
        return (float(old), 1.0) if old is not None else (None, None)

    def clip_range(self) -> tuple[float, float] | None:
        """`value_range` as (lo, hi), or None when the checkpoint certifies none."""
        if self.value_range is None:
            return None
        lo, hi = (float(x) for x in self.value_range)
        if not lo <= hi:
            raise ValueError(f"value_range {self.value_range} is not an interval")
        return lo, hi

    @property
    def reference_is_backbone(self) -> bool:
        """π_ref can be read from the backbone's own LM head (frozen backbone = the policy)."""
        return not self.lora and self.reference == self.backbone


def load_causal_lm(name_or_path: str) -> nn.Module:
    """A causal LM in float32 on CPU, in eval mode (dropout off: values must be deterministic)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    return model.eval()


def policy_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampling distribution at `temperature` over the last axis of `logits`: softmax of
    logits / T, and at T = 0 the greedy policy, one-hot at the argmax (the limit T → 0, and what
    the engine samples: vLLM treats temperature 0 as greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if temperature == 0:
        return nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return (logits / temperature).softmax(-1)


def hidden_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states [B, T, H] of a causal LM, without computing its logits.
    With LoRA injected (peft modifies the modules in place) the adapter takes part."""
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def pad_batch(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T]. Right padding keeps every real token at
    its natural position id, so values do not depend on what else is in the batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def save_checkpoint(out: Path, head: ValueHead, cfg: HeadConfig, lm: nn.Module | None = None) -> None:
    """Write config.json, head.safetensors and, for LoRA, adapter/ (peft)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(out / HEAD), metadata={"format": FORMAT, "method": cfg.method})
    if cfg.lora:
        assert lm is not None and hasattr(lm, "save_pretrained"), "LoRA checkpoint needs the peft model"
        lm.save_pretrained(str(out / ADAPTER))
    (out / CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def read_config(folder: Path) -> HeadConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a value-head checkpoint (no {CONFIG})")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a value-head checkpoint (format {raw.get('format')!r})")
    known = set(HeadConfig.__dataclass_fields__)
    return HeadConfig(**{k: v for k, v in raw.items() if k in known})


def load_checkpoint(folder: Path) -> tuple[HeadConfig, ValueHead, nn.Module]:
    """(config, head, backbone LM with any LoRA adapter merged), all float32 on CPU, eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_config(folder)
    if not (folder / HEAD).is_file():
        raise FileNotFoundError(f"{folder} has no {HEAD}")
    head = ValueHead(cfg.method, cfg.hidden_size, cfg.vocab_size)
    head.load_state_dict(load_file(str(folder / HEAD)))
    lm = load_causal_lm(cfg.backbone)
    if cfg.lora:
        from peft import PeftModel

        # Merged: serving needs no adapter switching, and the merged model is as fast as the base.
        lm = PeftModel.from_pretrained(lm, str(folder / ADAPTER)).merge_and_unload()
    if lm.config.hidden_size != cfg.hidden_size:
        raise ValueError(f"{folder}: head expects hidden size {cfg.hidden_size}, backbone "
                         f"{cfg.backbone} has {lm.config.hidden_size}")
    return cfg, head.eval(), lm.eval()
