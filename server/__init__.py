"""server: the HTTP process around the alignment algorithms (HTTP only).

Owns the FastAPI app factory (`app.py`) and its APIRouters (`routes/`), the OpenAI schema
(`protocol.py`), one serving object per endpoint that turns requests into `decoding` strategy
runs (`serving/`), auth, limits, lifecycle (drain), policy management and hot-swap
(`policy/`), request ids, tracing and metrics (`observability/`), the CAN dual's serving side
(`constraint.py`), errors, the HTTP settings (`settings.py`, on top of
runtime's EngineSettings). The command line is cli/'s; the engine, the scorers and start-up are runtime/'s;
nothing outside server/ imports server.
"""
