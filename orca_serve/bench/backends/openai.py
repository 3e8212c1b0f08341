"""Any OpenAI-compatible server (ours, vLLM, ``transformers serve``...), streamed.

Each request is one streaming ``/v1/completions`` call, greedy, with EOS
ignored through the vLLM extensions ``ignore_eos`` and ``min_tokens`` (which
our server also accepts); ``plain=True`` leaves them out for servers that
reject unknown fields. Prompts go as token ids by default, so every server
sees exactly the same prompt; ``prompt_mode="text"`` sends the decoded text.

What the HTTP path costs in CPU is measured beside the throughput (the run's
``backend_stats``): this client's CPU time, and from the server's /metrics,
where it has them, its process CPU and our server's event-loop CPU (the
thread that serves HTTP). vLLM's /metrics counts its API server process, its
engine runs in another. On a machine with two cores that CPU is taken from
the model's threads: it bounds the HTTP path against the engine in-process
more steadily than two throughputs measured minutes apart can.

The streamed requests go through aiohttp, whose C parser made this client
cost a third of the CPU that httpx's did (0.37-0.48 s against 1.31-1.41 s for
the 128-request trace, three runs each against our server on the 2-core
Xeon), and that CPU comes out of the server's share. vLLM's own serving
benchmark streams through aiohttp too. The side requests (the model list,
the /metrics scrapes) are off the measured path and use httpx.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from orca_serve.bench.backends.base import BackendRun, new_result
from orca_serve.bench.metrics import RequestResult
from orca_serve.bench.workloads import RequestSpec


def server_root(base_url: str) -> str:
    """``--base-url`` given with or without its /v1: the server's root, where
    /metrics is and under which /v1/completions and /v1/models are."""
    base = base_url.rstrip("/")
    return base.removesuffix("/v1")


def metrics_url(base_url: str) -> str:
    return server_root(base_url) + "/metrics"


# A scrape is a side figure taken around the run: a server that holds /metrics
# open costs the figure, not the run's timeout (an hour) twice.
_SCRAPE_TIMEOUT_S = 10.0

# Server CPU counters read from /metrics: the sample's name -> the name in backend_stats.
_SERVER_CPU = {"process_cpu_seconds_total": "server_process_cpu_s",
               "orca_serve_event_loop_cpu_seconds_total": "server_event_loop_cpu_s"}


def server_cpu(metrics_text: str) -> dict[str, float]:
    """The CPU counters a server's /metrics text has (``_SERVER_CPU``), summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            key = _SERVER_CPU.get(sample.name)
            if key is not None:
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class OpenAIBackend:
    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, tokenizer=None, prompt_mode: str = "ids",
                 plain: bool = False, api_key: str | None = None, vocab_size: int | None = None,
                 timeout_s: float = 3600.0) -> None:
        if prompt_mode not in ("ids", "text"):
            raise ValueError(f"prompt_mode must be 'ids' or 'text', got {prompt_mode!r}")
        self.url = server_root(base_url) + "/v1/completions"
        self.base_url = base_url
        self.tokenizer = tokenizer
        self.prompt_mode = prompt_mode
        self.plain = plain
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._vocab_size = vocab_size
        self.model_name = model or self._first_model()
        self.max_model_len = None

    def _first_model(self) -> str:
        url = server_root(self.base_url) + "/v1/models"
        try:
            resp = httpx.get(url, headers=self.headers, timeout=30.0)
            resp.raise_for_status()
            models = resp.json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError) as exc:  # down, refused, not an OpenAI server
            raise ValueError(f"cannot list the models at {url} (is the server at --base-url up?): "
                             f"{type(exc).__name__}: {exc}") from None
        if not models:
            raise ValueError(f"{url} lists no model; pass --model")
        return models[0]["id"]

    def vocab(self) -> tuple[int, list[int]]:
        if self.tokenizer is not None:
            return len(self.tokenizer), list(getattr(self.tokenizer, "all_special_ids", None) or [])
        if self._vocab_size is None:
            raise ValueError("the openai backend needs --tokenizer (or --vocab-size) to draw prompt token ids")
        return self._vocab_size, []

    def close(self) -> None:
        pass

    def payload(self, spec: RequestSpec) -> dict:
        if self.prompt_mode == "ids" and spec.prompt_token_ids is not None:
            prompt = spec.prompt_token_ids
        elif spec.prompt_text is not None:
            prompt = spec.prompt_text
        else:
            raise ValueError("text prompts need a tokenizer (--tokenizer) to decode the token ids")
        body = {"model": self.model_name, "prompt": prompt, "max_tokens": spec.output_len,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if spec.ignore_eos and not self.plain:
            body.update(ignore_eos=True, min_tokens=spec.output_len)
        return body

    def run(self, specs: list[RequestSpec], arrivals: list[float], max_concurrency: int | None = None,
            progress=lambda: None) -> BackendRun:
        return asyncio.run(self._run(specs, arrivals, max_concurrency, progress))

    async def _run(self, specs, arrivals, max_concurrency, progress) -> BackendRun:
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        # No cap on connections (limit=0), and the timeout per read, not per
        # request: a long request of a long run is not a failure.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as scraper, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                      headers=self.headers) as session:
            server_before = await self._server_cpu(scraper)
            cpu0, t0 = time.process_time(), time.perf_counter()

            async def one(spec: RequestSpec, arrival: float) -> RequestResult:
                await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
                if sem is None:
                    return await self._request(session, spec, progress)
                async with sem:
                    return await self._request(session, spec, progress)

            results = await asyncio.gather(*(one(s, a) for s, a in zip(specs, arrivals)))
            extra = {"client_cpu_s": time.process_time() - cpu0}
            server_after = await self._server_cpu(scraper)
        extra.update({key: server_after[key] - before for key, before in server_before.items() if key in server_after})
        end = max(max([r.finish for r in results], default=t0), t0 + 1e-9)
        if "server_event_loop_cpu_s" in extra:
            # Cores the HTTP path kept busy on average, client and server: on
            # one machine, what it took from the model's threads.
            extra["http_path_cores"] = (extra["client_cpu_s"] + extra["server_event_loop_cpu_s"]) / (end - t0)
        return BackendRun(list(results), t0, end, extra)

    async def _server_cpu(self, client: httpx.AsyncClient) -> dict[str, float]:
        """``server_cpu`` of the server's /metrics now; empty if it has none (a
        server without /metrics, or one that answers it with something else)."""
        try:
            resp = await client.get(metrics_url(self.base_url), timeout=_SCRAPE_TIMEOUT_S)
        except httpx.HTTPError:  # unreachable, or holds /metrics open
            return {}
        if resp.status_code != 200:
            return {}
        try:
            return server_cpu(resp.text)
        except Exception:  # not Prometheus text: the parser raises IndexError too, not only ValueError
            return {}

    async def _request(self, session: aiohttp.ClientSession, spec: RequestSpec, progress) -> RequestResult:
        r = new_result(spec, time.perf_counter())
        text, usage = [], None

        def take(line: bytes) -> None:
            nonlocal usage
            data = line[5:].strip() if line.startswith(b"data:") else None
            if not data or data == b"[DONE]":
                return
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(str(chunk["error"]))
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                r.chunk_times.append(time.perf_counter())
                text.append(choices[0]["text"])
            usage = chunk.get("usage") or usage

        try:
            async with session.post(self.url, json=self.payload(spec)) as resp:
                if resp.status != 200:
                    detail = (await resp.read()).decode(errors="replace")[:300]
                    raise RuntimeError(f"HTTP {resp.status}: {detail}")
                # Lines split here rather than by the reader's readline, which
                # refuses a line past twice its read buffer (128-512 KiB by
                # aiohttp's version): a long error message, or many logprobs.
                # A line's pieces wait in a list until its end comes, so a long
                # one costs its length once, not once per piece.
                pending: list[bytes] = []
                async for data in resp.content.iter_any():
                    lines = data.split(b"\n")
                    if len(lines) == 1:  # no line ends in this read
                        pending.append(data)
                        continue
                    take(b"".join([*pending, lines[0]]))
                    for line in lines[1:-1]:
                        take(line)
                    pending = [lines[-1]]
                take(b"".join(pending))
            r.finish = time.perf_counter()
            r.output_len = self._count_output(usage, "".join(text), len(r.chunk_times))
            if usage and usage.get("prompt_tokens"):
                r.prompt_len = int(usage["prompt_tokens"])
            r.success = r.output_len > 0
            if not r.success:
                r.error = "no output tokens"
        except Exception as exc:  # one failed request is a result, not a crash
            r.finish, r.error = time.perf_counter(), f"{type(exc).__name__}: {exc}"
        progress()
        return r

    def _count_output(self, usage: dict | None, text: str, num_chunks: int) -> int:
        # The server's own count is exact; re-tokenizing text is not, so it is a fallback.
        if usage and usage.get("completion_tokens") is not None:
            return int(usage["completion_tokens"])
        if self.tokenizer is not None and text:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return num_chunks
