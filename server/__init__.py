"""server: the HTTP process around the alignment algorithms.

Owns the FastAPI app factory (`app.py`), the OpenAI schema (`protocol.py`), the serving object
that turns requests into `decoding` strategy runs (`serving.py`), the vLLM engine wrapper (the
only vllm import, `engine.py`), the scorer registry, metrics, errors, settings and the CLI.
"""
