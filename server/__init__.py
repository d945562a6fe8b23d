"""server: the HTTP process around the alignment algorithms.

Owns the FastAPI app factory (`app.py`) and its APIRouters (`routes/`), the OpenAI schema
(`protocol.py`), one serving object per endpoint that turns requests into `decoding` strategy
runs (`serving/`), the vLLM engine wrapper (the only vllm import, `engine.py`), the scorer
registry, metrics, errors, settings and the CLI.
"""
