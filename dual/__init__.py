"""dual: `alignserve dual`, CAN's optimal safety weight λ* from a rollout folder (cli.py).

The maths (the dual D̂(λ), its solver, the predicted safety) is `decoding/dual.py`, shared with
the server's `cost_weight: "auto"`; this package owns the command: scores from the rollouts
(or rescored with the runtime's scorer registry), the JSON the server loads, and the plot.
Imports decoding, runtime and valuenet's rollout data; never server.
"""
