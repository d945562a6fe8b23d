"""valuenet: prefix value heads V(x, yᵗ) for controlled decoding (Mudgal et al. 2024, arXiv
2310.17022: CD-FUDGE, after FUDGE, Yang & Klein 2021; and CD-Q).

- `data.py`      rollout folders (manifest.json + rollouts.jsonl), written by `rollouts.py`
                 (`alignserve rollouts`: K samples per prompt from the reference policy, scored).
- `model.py`     a causal-LM backbone + value head (scalar for CD-FUDGE, vocabulary-sized for
                 CD-Q), checkpoint layout (config.json, head.safetensors, adapter/ for LoRA).
- `losses.py`    CD-FUDGE regression and CD-Q Bellman targets on position-aligned tensors.
- `train.py`     the offline trainer (dataclass config, explicit loop, frozen backbone with cached
                 hidden states or LoRA), `report.py` its metrics (correlation of V with the
                 reward by prefix length) and plots; `cli.py` is `alignserve train-value`.
- `scorer.py`    trained heads as `decoding.protocols` TokenScorer / QScorer, which the server
                 registers as scorers `value:NAME` (`--value-head NAME=PATH`).

Imports torch, transformers and peft, and runtime (rollouts start the engine through it), never
server, fastapi or vllm; the value-head code runtime loads (scorer, processor, incremental, model,
kvcache) imports neither runtime nor server.
"""
