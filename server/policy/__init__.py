"""Policy management: which weights the server serves and how they change without a restart.

`manager.py` (PolicyManager: register, activate, remove; the hot-swap), `gate.py` (the gate a
swap closes and the lease each request holds), `guard.py` (allowed folders, the canary),
`checkpoints.py` (checks a checkpoint folder before the engine is touched) and `file.py` (the
fleet-wide policy file every replica watches). The admin routes are server/routes/policies.py.
"""
