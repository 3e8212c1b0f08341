"""Benchmark suite: fixed-seed workloads, load generation against the engine,
an OpenAI-compatible server or the transformers peers, vLLM-style metrics plus
Orca's normalized latency, sweeps, plots, comparisons and a roofline.

Modules: workloads (what each request asks for and when it arrives), metrics
(per-request results -> figures), backends/ (targets), runner (one command's
runs), report (tables, compare), plot, roofline (with model_flops, its
arithmetic), cli.
"""
