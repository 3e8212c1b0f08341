"""Offline API: ``LLM(...).generate(prompts, params)``."""
from __future__ import annotations

import itertools
import numbers

from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.entrypoints.chat_messages import conversation
from orca_serve.outputs import RequestOutput
from orca_serve.sampling_params import SamplingParams


class LLM:
    """Runs the engine in this thread until every prompt is done.

    ``LLM(model=None)`` serves the embedded SmolLM2-135M-Instruct. Keyword
    arguments are engine settings by name (see config.py), e.g.
    ``max_num_seqs``, ``max_num_batched_tokens``, ``kv_allocation``,
    ``num_kv_blocks``, ``block_size``, ``scheduling_policy``.
    """

    def __init__(self, model: str | None = None, dtype: str = "float32", **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, dtype=dtype, **engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, priority, use_tqdm, "prompt")

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (a list of
        {"role", "content"} dicts) or a list of conversations, then generate.

        Messages are checked as the OpenAI server checks them
        (entrypoints/chat_messages.py), except that any role a template knows
        is taken and keys past role, content and name (tool_calls, ...) reach
        the template as given. A malformed message or a template that fails
        is a ValueError naming it (``conversation 1: messages[0].role ...``),
        raised before any conversation is queued.
        """
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of {{role, content}} dicts or a list of such lists, "
                             f"got {type(messages).__name__}")
        many = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = messages if many or not messages else [messages]  # []: none, as generate([]) runs none
        prompts = []
        for i, conv in enumerate(conversations):
            try:
                prompts.append(self.engine.apply_chat_template(conversation(conv, keep_other_keys=True)))
            except ValueError as exc:
                if not many:
                    raise
                raise ValueError(f"conversation {i}: {exc}") from exc
        return self._run(prompts, sampling_params, None, use_tqdm, "conversation")

    def _run(self, prompts: list, sampling_params, priority, use_tqdm: bool, what: str) -> list[RequestOutput]:
        """Queue ``prompts`` and step until all are done; a bad one is a
        ValueError naming it by ``what`` and index, and nothing stays queued."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(params_list) != len(prompts) or len(priorities) != len(prompts):
            raise ValueError(f"sampling_params and priority lists must have one entry per {what}")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, prompt, params, prio in zip(ids, prompts, params_list, priorities):
                self.engine.add_request(rid, prompt, params, priority=prio)
                added.append(rid)
        except BaseException as exc:  # the prompts queued before it must not run on unseen
            self._abort(added)
            if isinstance(exc, ValueError):
                raise ValueError(f"{what} {len(added)}: {exc}") from exc
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        wanted = set(ids)  # outputs of requests some earlier, interrupted call left are not this call's
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:  # Ctrl-C, or the engine failed: none of this call's requests may linger
            self._abort([rid for rid in ids if rid not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            self.engine.abort_request(rid)
        self._drain()

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()
