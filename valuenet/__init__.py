"""valuenet: prefix value heads V(x, yᵗ) for controlled decoding (Mudgal et al. 2024, arXiv
2310.17022: CD-FUDGE, after FUDGE, Yang & Klein 2021; and CD-Q).

- `data.py`      rollout folders (manifest.json + rollouts.jsonl), written by `rollouts.py`
                 (`alignserve rollouts`: K samples per prompt from the reference policy, scored).
- `losses.py`    CD-FUDGE regression and CD-Q Bellman targets on position-aligned tensors.
- `train.py`     the offline trainer (dataclass config, explicit loop, frozen backbone with cached
                 hidden states or LoRA), `report.py` its metrics (correlation of V with the
                 reward by prefix length) and plots; `cli.py` is `alignserve train-value`.
- `rollouts.py`  the `alignserve rollouts` library (engine side), `http_rollouts.py` the same
                 against a running server, `rollouts_cli.py` the command's flags and entry point.

The model, its checkpoints and the inference side (scorers `value:NAME`, the in-engine CD-Q tilt)
live in `heads/`, below runtime; this package is the offline trainer and imports them from there.

Imports torch, transformers and peft, `heads` and runtime (rollouts start the engine through it),
never server, fastapi or vllm; runtime never imports it.
"""
