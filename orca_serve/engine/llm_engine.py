"""The engine: add_request / abort_request / step. Not thread-safe: one thread
drives it (the offline LLM directly, the server through async_engine)."""
from __future__ import annotations

import logging
import numbers
import os
import time
from collections import deque
from dataclasses import dataclass

from orca_serve.config import EngineConfig
from orca_serve.distributed.plan import resolve_parallel
from orca_serve.engine.errors import EngineDeadError
from orca_serve.engine.executor import make_executor
from orca_serve.engine.output_processor import OutputProcessor
from orca_serve.engine.request_checks import RequestChecks
from orca_serve.outputs import RequestOutput
from orca_serve.request import Request, RequestStatus
from orca_serve.sampling_params import SamplingParams
from orca_serve.scheduler import Scheduler
from orca_serve.shown import shown

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_free: int
    num_preemptions_total: int
    num_iterations: int
    last_num_batched_tokens: int
    last_num_reqs: int
    last_iteration_seconds: float
    num_swaps_total: int = 0
    # Goodput bookkeeping: finished requests, and those that met every SLO target they had.
    num_finished_total: int = 0
    num_slo_met_total: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from orca_serve.models.loader import get_model_facts, load_tokenizer

        self.tokenizer = load_tokenizer(config.model)
        facts = get_model_facts(config.model, tokenizer=self.tokenizer)
        self.config = config = resolve_parallel(config, facts)  # --parallel auto picks T and P here
        self.facts = facts
        self.model_name = served_model_name(config.model)
        self.vocab_size = facts.vocab_size
        self.max_model_len = facts.max_model_len
        self.eos_token_ids = tuple(facts.eos_token_ids)
        par = config.parallel
        # Async scheduling keeps the next batch queued behind the running one.
        self._depth = 2 if config.scheduler.async_scheduling else par.inflight_batches
        # The ranks size both KV pools (worker/kv_sizing.py): the device pool fixed
        # by the config or, on a GPU, from what a profile run leaves; the host
        # pool for swap-mode preemption from swap_space_gb.
        self.executor = make_executor(config)
        if config.cache.preemption_mode == "swap" and self.executor.num_cpu_blocks == 0:
            logger.warning("preemption_mode='swap' but swap_space_gb=%g holds no KV block: every preemption "
                           "recomputes, as with preemption_mode='recompute'", config.cache.swap_space_gb)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.executor.num_kv_blocks, self.max_model_len,
                                   num_cpu_blocks=self.executor.num_cpu_blocks,
                                   max_inflight_batches=par.inflight_batches)
        self._outputs = OutputProcessor(self.scheduler, self.tokenizer)
        self._checks = RequestChecks(self.vocab_size, self.eos_token_ids)
        self._aborted: list[RequestOutput] = []  # their outputs, made when aborted, handed out by the next step
        self._last = (0, 0, 0.0)
        self._pipeline: deque = deque()  # (SchedulerOutput, submit time, executor handle)
        self._collected_at = 0.0  # when the last batch's tokens came back
        self._dead: str | None = None  # why the executor (a worker) failed; the engine is then unusable

    # ---- requests ----------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            try:
                prompt.encode()
            except UnicodeEncodeError as exc:  # the tokenizer's own error names no field
                raise ValueError(f"prompt: text holds an unpaired UTF-16 surrogate at {exc.start}") from None
            return list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)):
            # The common case in one pass of C-level builtins: the per-id checks
            # below cost ~7x as much (numbers.Integral is an ABC check), and
            # they run on the engine thread.
            if all(type(t) is int for t in prompt) and (not prompt or 0 <= min(prompt) and max(prompt) < self.vocab_size):
                return list(prompt)
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):  # numpy integers are fine
                    raise ValueError(f"prompt: token ids must be integers, got {shown(t)}")
                if not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt: token id {shown(t)} is outside the vocabulary [0, {self.vocab_size})")
            return [int(t) for t in prompt]
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of one conversation (checked already: entrypoints/chat_messages.py)
        rendered by the model's chat template; a ValueError if the template fails."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no chat template")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # a template's raise_exception (jinja's TemplateError), a TypeError, ...
            raise ValueError(f"messages: the chat template failed: {type(exc).__name__}: {exc}") from exc
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    priority: int = 0, arrival_time: float | None = None, ttft_slo: float | None = None,
                    tpot_slo: float | None = None, user: str | None = None) -> None:
        """Queue a request; it joins the batch at the next iteration.

        Raises ValueError naming the bad field, QueueFullError when the
        waiting queue is at its bound, or EngineDeadError after a worker failed.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        # Its fields may have been set since it was made; a list a running
        # request uses is not checked again (the sequences of a request share theirs).
        held = self._checks.check(params)
        try:
            token_ids = self.tokenize(prompt)
            if not token_ids:
                raise ValueError("prompt is empty")
            if len(token_ids) >= self.max_model_len:
                raise ValueError(f"prompt has {len(token_ids)} tokens; the model's context length is "
                                 f"{self.max_model_len} (at least one token must be left to generate)")
            if len(token_ids) + params.max_tokens > self.max_model_len:
                raise ValueError(f"max_tokens ({shown(params.max_tokens)}) + prompt ({len(token_ids)} tokens) "
                                 f"exceeds the model's context length {self.max_model_len}")
            sched = self.config.scheduler
            req = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids, priority=priority,
                          arrival_time=time.monotonic() if arrival_time is None else arrival_time,
                          ttft_slo=ttft_slo if ttft_slo is not None else sched.default_ttft_slo_s,
                          tpot_slo=tpot_slo if tpot_slo is not None else sched.default_tpot_slo_s, user=user)
            req.held = held  # until it finishes
            self.scheduler.add_request(req)
        except BaseException:
            # A refused request holds no checks: its traceback may be kept
            # (pytest.raises keeps it), and its lists may change meanwhile.
            held.clear()
            raise
        stop_index = self._outputs.add_request(request_id, prompt, token_ids, params)
        if stop_index is not None:
            req.held.append(stop_index)

    def abort_request(self, request_id: str) -> None:
        """Abort a request; an id that is not (or no longer) a request's is ignored."""
        if not isinstance(request_id, str):  # never a request's: add_request takes only strings
            return
        req = self.scheduler.abort_request(request_id)
        if req is not None:
            # Its output now, not at the next step: that drops what its id
            # holds in the output processor (its detokenizer), so a new request
            # may take the id once this returns. Its lists were let go when the
            # scheduler finished it (Request.held), so they may change too.
            self._aborted.append(self._outputs.make_output(req))

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self._aborted) or self._outputs.has_held()
                or bool(self._pipeline))

    # ---- the iteration ----------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> execute -> update.

        With P pipeline stages up to P batches are in flight: a new batch is
        submitted while older ones are still in the pipeline, and the oldest
        is collected (and its tokens applied) once the pipeline is full or
        nothing new can be scheduled. Async scheduling keeps two batches
        queued on one device the same way: batch i+1 is scheduled and
        launched, then batch i collected.
        """
        t0 = time.perf_counter()
        so = self.scheduler.schedule()
        if so.goes_out:
            self._pipeline.append((so, time.perf_counter(), self.executor.submit(so)))
        advanced = []
        if self._pipeline and (len(self._pipeline) >= self._depth or so.is_empty):
            done, t_submit, handle = self._pipeline.popleft()
            advanced = self._collect(done, t_submit, handle)
        self._last = (so.total_num_scheduled_tokens, so.num_reqs, time.perf_counter() - t0)
        rejected, self.scheduler.rejected = self.scheduler.rejected, []
        outputs = self._aborted + [self._outputs.make_output(req) for req in rejected + advanced]
        self._aborted = []
        return self._outputs.release(outputs)

    def _collect(self, so, t_submit: float, handle) -> list[Request]:
        try:
            out = self.executor.collect(handle)
        except Exception as exc:  # the batch fails; the engine and other requests go on
            logger.exception("iteration %d failed", so.iteration)
            error = f"{type(exc).__name__}: {exc}"
            if self._executor_alive():
                return self.scheduler.fail_batch(so, error)
            # A lost worker takes every request down: fail them all now, so no client waits.
            failed = list(self.scheduler.requests.values())
            self._pipeline.clear()
            for req in failed:
                req.error = error
            self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
            return failed
        now = time.perf_counter()
        # With async scheduling a batch waits on the device behind the one
        # before it, so its own time starts when that one's tokens came back.
        start = max(t_submit, self._collected_at) if self.config.scheduler.async_scheduling else t_submit
        self._collected_at = now
        if not so.is_empty:  # a batch that only moved blocks or finished requests says nothing of model time
            self.scheduler.observe_iteration(so.total_num_scheduled_tokens, now - start)
        advanced = self.scheduler.update(so, out)
        self._attach_logprobs(advanced, out)
        return advanced

    def _attach_logprobs(self, reqs: list[Request], out) -> None:
        for req in reqs:
            lp = out.logprobs.get(req.request_id)
            if lp is not None:
                req.logprobs.append(lp)

    def _executor_alive(self) -> bool:
        try:
            self.executor.check_health()
        except Exception as exc:
            self._dead = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def is_healthy(self) -> bool:
        """False once a worker died or hung (the engine then refuses new requests)."""
        return self._dead is None

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine or one of its workers failed."""
        if self._dead is None:
            self._executor_alive()
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_kv_blocks_total=s.kv.num_blocks,
            num_kv_blocks_free=s.kv.num_free_blocks, num_preemptions_total=s.num_preemptions_total,
            num_iterations=s.iteration, last_num_batched_tokens=self._last[0], last_num_reqs=self._last[1],
            last_iteration_seconds=self._last[2], num_swaps_total=s.num_swaps_total,
            num_finished_total=self._outputs.num_finished, num_slo_met_total=self._outputs.num_slo_met)

    def shutdown(self) -> None:
        self.executor.shutdown()


def served_model_name(model_config) -> str:
    """The name clients use: the checkpoint's basename, the dummy preset, or the default."""
    if model_config.model is not None:
        return os.path.basename(os.path.normpath(model_config.model)).removesuffix(".gguf")
    if model_config.load_format == "dummy" and isinstance(model_config.dummy_config, str):
        return f"dummy-{os.path.basename(model_config.dummy_config)}"
    return "SmolLM2-135M-Instruct"

