"""The core the HTTP server and every offline tool share.

Owns: the engine (`engine.py`, `VllmEngine`, the only module importing vllm, lazily, together
with the CD-Q logits processor `cdq_plugin.py` that runs in the engine's worker), the scorer
registry (`scorers.py`, `remote_scorer.py`, cross-request batching in `batching.py`), the engine
settings (`settings.py`, which the server's HTTP `Settings` extends), model resolution and
start-up/teardown (`startup.py`: `resolve_model`, `build_runtime`, `open_runtime`), what a
`Runtime` is (`protocols.py`: `Runtime` and the `ServingEngine` protocol), the prompt helpers
(`prompts.py`: `load_prompts`, `chat_prompt_ids`) and the headless plotting set-up
(`plotting.py`).

Imports `decoding` (the algorithms' protocols) and `heads` (value-head inference); never
`server` nor an offline tool (tests/unit/test_architecture.py checks it).
"""
