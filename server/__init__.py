"""server: the HTTP process around the alignment algorithms (HTTP only).

Owns the FastAPI app factory (`app.py`) and its APIRouters (`routes/`), the OpenAI schema
(`protocol.py`), one serving object per endpoint that turns requests into `decoding` strategy
runs (`serving/`), auth, limits, lifecycle (drain), policy hot-swap (`policies.py`,
`policy_file.py`), metrics, tracing, errors, the HTTP settings (`settings.py`, on top of
runtime's EngineSettings) and the CLI. The engine, the scorers and start-up are runtime/'s;
nothing outside server/ imports server.
"""
