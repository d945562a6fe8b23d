"""vLLM plugin: tokenwise CD-Q as a V1 logits processor (logic: heads/processor.py).

vLLM imports this module by name (`AsyncEngineArgs(logits_processors=[FQCN])`, set by
runtime/engine.py when CD-Q heads are configured): in the engine's worker process, where it
builds the processor, and in the API process, where `validate_params` checks each request's
`extra_args` (a ValueError there is a 400). Nothing in alignserve imports it otherwise; it is
the one module besides runtime/engine.py that imports vllm, because a logits processor must
subclass vLLM's base class.
"""

from __future__ import annotations

import os

from vllm.v1.sample.logits_processor import LogitsProcessor

from heads.incremental import load_engine_heads
from heads.processor import (
    CONTROLS_NEUTRAL,
    ENV_STATS,
    CdqTilt,
    check_request,
    configured_heads,
)

FQCN = "runtime.cdq_plugin:CdqLogitsProcessor"


class CdqLogitsProcessor(CdqTilt, LogitsProcessor):
    """Applies p's penalties and truncation (`extra_args["cdq"]["p"]`), then adds T·λ·Q(x, yᵗ, ·),
    to the rows of requests with `extra_args["cdq"]`."""

    def __init__(self, vllm_config, device, is_pin_memory: bool) -> None:
        vocab = vllm_config.model_config.get_vocab_size()
        # a head on this very backbone reads hidden states from its logits (heads/incremental.py);
        # a quantised model's logits are not the checkpoint's W·h
        policy = None if vllm_config.quant_config else vllm_config.model_config.model
        CdqTilt.__init__(self, heads=load_engine_heads(configured_heads(), vocab, device, policy),
                         stats_dir=os.environ.get(ENV_STATS))

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # vLLM's own penalties and truncation would act after the tilt: off for a tilted request
        controls = {k: getattr(sampling_params, k) for k in CONTROLS_NEUTRAL}
        check_request(sampling_params.extra_args, sampling_params.n, sampling_params.temperature,
                      controls)
