"""heads: value-head inference, the half of controlled decoding that runs while serving
(Mudgal et al. 2024, arXiv 2310.17022: CD-FUDGE and CD-Q heads trained by `valuenet/`).

- `model.py`       a causal-LM backbone + value head, the checkpoint layout (config.json,
                   head.safetensors, adapter/ for LoRA); valuenet's trainer writes it.
- `kvcache.py`     the backbone's own KV cache across scorer calls; `slots.py` the per-request
                   slot cache of the in-engine tilt.
- `scorer.py`      trained heads as `decoding.protocols` TokenScorer / QScorer (`value:NAME`).
- `incremental.py` one-token-per-step CD-Q heads for the engine; `processor.py` the logic of
                   the CD-Q logits processor (runtime/cdq_plugin.py subclasses vLLM's base).

Sits below runtime: imports torch, transformers and peft, never another project package
(tests/unit/test_architecture.py checks it); runtime imports it, the trainer `valuenet/` too.
"""
