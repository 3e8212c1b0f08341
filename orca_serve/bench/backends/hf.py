"""Hugging Face transformers as peers: static batches and continuous batching.

``hf-static``: ``model.generate`` on left-padded batches of up to B arrived
requests, each batch run to its longest request and returned at its end (no
one joins meanwhile): the request-level serving that Orca replaces. It tries
every batch size in a list and keeps the best output throughput. Like the
engine's request-level policy, a request's tokens reach the client in one
chunk when its batch returns.

``hf-cb``: transformers' own continuous batching manager
(``init_continuous_batching``), fed from a thread at the arrival times; the
manager records a timestamp per generated token.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from orca_serve.bench.backends.base import Admission, BackendRun, fail_unfinished, new_result, sleep_until
from orca_serve.bench.hf_model import load_hf_model
from orca_serve.bench.workloads import RequestSpec


class _HFBase:
    def __init__(self, model: str | None, dtype: str = "float32", load_format: str = "auto",
                 dummy_config: str | None = None, device: str = "auto") -> None:
        self.model, self.tokenizer = load_hf_model(model, dtype, load_format, dummy_config, device=device)
        cfg = self.model.config
        self.model_name = getattr(cfg, "_name_or_path", None) or cfg.model_type
        self.max_model_len = getattr(cfg, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def vocab(self) -> tuple[int, list[int]]:
        special = list(getattr(self.tokenizer, "all_special_ids", None) or [])
        return self.model.config.vocab_size, special + self.eos_ids

    def close(self) -> None:
        pass


class HFStaticBackend(_HFBase):
    name = "hf-static"

    def __init__(self, *args, batch_sizes: list[int] = (8, 32, 128), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sizes = sorted(set(batch_sizes))
        self.passes = len(self.batch_sizes)  # the progress bar covers every batch size tried

    def run(self, specs: list[RequestSpec], arrivals: list[float], max_concurrency: int | None = None,
            progress=lambda: None) -> BackendRun:
        best, tried = None, {}
        for b in self.batch_sizes:
            run = self._run_batch_size(b, specs, arrivals, max_concurrency, progress)
            tokens = sum(r.output_len for r in run.results if r.success)
            tried[str(b)] = tokens / run.duration
            if best is None or tried[str(b)] > best[1]:
                best = (run, tried[str(b)], b)
        run, _, b = best
        run.extra = {"batch_size": b, "output_throughput_by_batch_size": tried}
        return run

    @torch.inference_mode()
    def _run_batch_size(self, batch_size, specs, arrivals, max_concurrency, progress) -> BackendRun:
        t0 = time.perf_counter()
        adm = Admission(arrivals, max_concurrency, t0)
        queue, results, done = [], {}, 0
        while done < len(specs):
            queue += adm.due()
            if not queue:
                hint = adm.wait_hint()
                sleep_until(time.perf_counter() + (hint if hint is not None else 0.001))
                continue
            batch, queue = queue[:batch_size], queue[batch_size:]
            for i, start in batch:
                results[i] = new_result(specs[i], start)
            self._generate([specs[i] for i, _ in batch], [results[i] for i, _ in batch])
            end = results[batch[0][0]].finish
            for _ in batch:
                adm.done(end)
                done += 1
                progress()
        out = fail_unfinished(results, specs, "never finished", time.perf_counter())
        return BackendRun(out, t0, max(r.finish for r in out))

    def _generate(self, batch: list[RequestSpec], results) -> None:
        width = max(len(s.prompt_token_ids) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):  # left padding: every prompt ends at the last column
            ids[row, width - len(s.prompt_token_ids):] = torch.tensor(s.prompt_token_ids)
            mask[row, width - len(s.prompt_token_ids):] = 1
        max_new = max(s.output_len for s in batch)
        # EOS is ignored only if every request in the batch asks for it (a batch shares one config).
        min_new = max_new if all(s.ignore_eos for s in batch) else 0
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        try:
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                      min_new_tokens=min_new, do_sample=False, pad_token_id=self.pad_id)
        except Exception as exc:
            end = time.perf_counter()
            for r in results:
                r.finish, r.error = end, f"{type(exc).__name__}: {exc}"
            return
        end = time.perf_counter()
        for row, (s, r) in enumerate(zip(batch, results)):
            gen = out[row, width:].tolist()[: s.output_len]
            if not s.ignore_eos:
                stop = next((k + 1 for k, t in enumerate(gen) if t in self.eos_ids), len(gen))
                gen = gen[:stop]
            # generate() returns every sequence when the whole batch is done: one chunk, at the end.
            r.output_len, r.chunk_times, r.finish, r.success = len(gen), [end], end, True


class HFContinuousBackend(_HFBase):
    name = "hf-cb"

    def __init__(self, *args, max_batch_tokens: int = 512, page_size: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_batch_tokens = max_batch_tokens
        self.page_size = page_size

    def _cb_config(self, specs: list[RequestSpec]):
        from transformers import ContinuousBatchingConfig

        # Size the cache for the whole workload in flight at once. Left to itself on CPU,
        # transformers sizes it from all of the host's memory, and its attention masks
        # grow with the cache, so every iteration would pay for a cache it never uses.
        pages = sum(-(-(len(s.prompt_token_ids) + s.output_len) // self.page_size) for s in specs)
        return ContinuousBatchingConfig(page_size=self.page_size, num_blocks=pages + 1,
                                        max_batch_tokens=self.max_batch_tokens, allow_block_sharing=False)

    @torch.inference_mode()
    def run(self, specs: list[RequestSpec], arrivals: list[float], max_concurrency: int | None = None,
            progress=lambda: None) -> BackendRun:
        from transformers import GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints, logger

        # Its CPU memory probe wants psutil and logs an error without it; the cache is sized
        # explicitly here (see _cb_config), so the probe's answer is never used.
        logger.setLevel(logging.CRITICAL)

        max_out = max(s.output_len for s in specs)
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_out, pad_token_id=self.pad_id,
                                   eos_token_id=self.eos_ids or None)
        hints = WorkloadHints(max_prompt_length=max(len(s.prompt_token_ids) for s in specs),
                              max_generated_length=max_out, num_requests=len(specs))
        manager = self.model.init_continuous_batching(generation_config=gen_cfg,
                                                      continuous_batching_config=self._cb_config(specs),
                                                      workload_hints=hints)
        manager.start()
        try:
            return self._drive(manager, specs, arrivals, max_concurrency, progress)
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()

    def _drive(self, manager, specs, arrivals, max_concurrency, progress) -> BackendRun:
        t0 = time.perf_counter()
        adm = Admission(arrivals, max_concurrency, t0)
        results: dict[int, object] = {}
        rejected: queue.SimpleQueue = queue.SimpleQueue()
        submit = threading.Thread(target=self._submit, args=(manager, specs, adm, results, rejected), daemon=True)
        submit.start()
        done = 0
        while done < len(specs):
            while not rejected.empty():  # the manager refused it: a failed request, never a result
                rejected.get()
                done += 1
                progress()
            if done >= len(specs):
                break
            out = manager.get_result(timeout=0.5)
            if out is None:
                if not manager.is_running():
                    break
                continue
            if not out.is_finished():
                continue
            now = time.perf_counter()
            r = results[int(out.request_id)]
            r.chunk_times = list(out.timestamps or [])
            r.output_len, r.finish = len(out.generated_tokens), now
            r.success, r.error = out.error is None, out.error
            adm.done(now)
            done += 1
            progress()
        submit.join(timeout=5)
        end = time.perf_counter()
        return BackendRun(fail_unfinished(results, specs, "never finished", end), t0, end)

    def _submit(self, manager, specs, adm: Admission, results, rejected) -> None:
        while not adm.exhausted:
            for i, start in adm.due():
                s = specs[i]
                results[i] = r = new_result(s, start)
                rid = manager.add_request(s.prompt_token_ids, request_id=str(i), max_new_tokens=s.output_len,
                                          record_timestamps=True,
                                          eos_token_id=-1 if s.ignore_eos else (self.eos_ids or -1))
                if rid is None:
                    r.finish, r.error = time.perf_counter(), "rejected by the continuous batching manager"
                    adm.done(r.finish)
                    rejected.put(i)
            hint = adm.wait_hint()
            if hint is None:
                with adm.slot_freed:  # all slots busy: wait until one frees
                    adm.slot_freed.wait(timeout=0.05)
            else:
                sleep_until(time.perf_counter() + min(hint, 0.05))
