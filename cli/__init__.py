"""cli: the `alignserve` command line, the one package above every other: `main.py` builds the
parser from its command table (real imports, so the package rules see every arrow), `serve.py`
derives `alignserve serve`'s flags from the server's `Settings` and starts it, and each offline
command's flags and entry point stay with its tool (evaluation.cli, valuenet.rollouts_cli,
valuenet.cli, dual.cli, finetune.cli). A command module keeps its top light (the parser imports
them all): torch and vllm load inside its `run`.
"""
