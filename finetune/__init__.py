"""Policy fine-tuning for constrained alignment: SafeDPO and MoCAN (`alignserve finetune`).

Owns preference data and offline training; never imported by the server at request time.

- `pairs`    PKU-SafeRLHF preference pairs: load (JSONL, local dataset folder, `datasets` name),
             validate, split.
- `safedpo`  SafeDPO's transform T (arXiv 2505.20065): keep / swap / drop by safety labels.
- `mocan`    MoCAN relabelling (arXiv 2405.19544): P(y₁ ≻ y₀) = σ(w₁ − w₀), w = r + λ*·g.
- `losses`   SafeDPO / DPO losses and pair statistics on sequence log-probs (torch).
- `trainer`  TRL `DPOTrainer` with SafeDPO's per-pair offset; LoRA or full; saves a servable
             checkpoint (merged safetensors or a LoRA adapter).
- `report`   report.json, report.md, loss_curve.png.
- `common`   what every method's command shares: PROG, the base policy, the weight/run flags
             (light: the parser imports it).
- `utils`    what every training style shares: right-padded batches, loading the policy, the
             LoRA config, the pad token, readable saved weights, batch index picking.
- `cli`      `alignserve finetune safedpo | mocan` (CAN's λ* itself: the `dual` package).
- `data/`    a synthetic PKU-SafeRLHF-style set for tests and its generator script.

Data flow: pairs → (transform | score + relabel) → DPO examples → trainer → checkpoint + report.
"""
