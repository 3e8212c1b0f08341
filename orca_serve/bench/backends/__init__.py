"""Benchmark targets. Every backend offers the same small surface:

- ``name``, ``model_name``, ``tokenizer`` (or None), ``max_model_len`` (or None)
- ``vocab() -> (vocab_size, special_ids)``: where random prompt ids may come from
- ``run(specs, arrivals, max_concurrency, progress) -> BackendRun``: send each
  request at its arrival (seconds after the run's start), call ``progress()``
  as each one ends, and return one ``RequestResult`` per spec
- ``close()``

Backends import their heavy dependencies (the engine, transformers, httpx)
themselves, so choosing one never loads the others.
"""
