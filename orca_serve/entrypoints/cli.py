"""``orca-serve`` command line: generate, serve, bench.

Engine flags are derived from the config dataclasses by field name
(``--max-num-seqs`` -> SchedulerConfig.max_num_seqs), so a new config field
is a new flag with no extra code.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from orca_serve import config
from orca_serve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from orca_serve.entrypoints.arg_types import integer

_CHOICES = {"kv_allocation": config.KV_ALLOCATION_MODES, "preemption_mode": config.PREEMPTION_MODES,
            "scheduling_policy": config.SCHEDULING_POLICIES, "slo_admission": ("reject", "best-effort"),
            "load_format": ("auto", "dummy"), "dtype": config.DTYPES, "parallel": config.PARALLEL_MODES,
            "cpu_kernels": config.CPU_KERNEL_MODES, "triton_decode": config.CPU_KERNEL_MODES,
            "device": config.DEVICES}
_SKIP = {"dummy_config"}  # set through --dummy-config below (a name, not a dict)
# Flags whose name alone misleads: the request-level baseline's batch knobs do
# not cap the iteration-level policies (those admit up to --max-num-seqs).
_HELP = {"max_batch_size": "request-level policy only: requests per batch (other policies: see --max-num-seqs)",
         "max_queue_delay_s": "request-level policy only: longest wait for a batch to fill",
         "kv_cache_memory_gb": "KV pool per device, GiB (unset: on a GPU what --gpu-memory-utilization leaves "
                               "after the weights and a profile run of the largest batches, on a CPU 2)",
         "gpu_memory_utilization": "on a GPU without --kv-cache-memory-gb or --num-kv-blocks: the share of "
                                   "the device that weights, activations and the KV pool may fill"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for cls in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _SKIP:
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kind = base[0] if base[0] in (int, float, str, bool) else str
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                parse = integer if kind is int else kind  # int() would not say why a huge number fails
                group.add_argument(flag, dest=f.name, type=parse, default=None, choices=_CHOICES.get(f.name),
                                   help=f"{_HELP[f.name]}; default: {f.default!r}" if f.name in _HELP
                                   else f"default: {f.default!r}")
    group.add_argument("--dummy-config", dest="dummy_config", default=None,
                       help="with --load-format dummy: a preset name (e.g. gpt3-13b) or a config.json path")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for cls in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)
             for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return EngineConfig.from_kwargs(**kwargs)


def _cmd_generate(args: argparse.Namespace) -> int:
    from orca_serve.engine.llm_engine import LLMEngine
    from orca_serve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed_sampling)
    engine = LLMEngine(engine_config_from_args(args))
    if args.chat:
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ValueError("--chat: this model has no chat template; pass --no-chat")
        prompt = engine.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    engine.add_request("cli-0", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.delta_text:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                if out.error:
                    raise ValueError(out.error)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from orca_serve.entrypoints.openai.server import run_server

    run_server(engine_config_from_args(args), host=args.host, port=args.port, api_key=args.api_key,
               max_body_bytes=args.max_body_bytes, log_level=args.log_level,
               served_model_name=args.served_model_name, request_log_level=args.request_log_level,
               shutdown_timeout_s=args.shutdown_timeout_s)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from orca_serve.distributed.launch import run_node

    if args.master_port is None:
        raise ValueError("worker: --master-port is required (the driver's rendezvous port)")
    return run_node(args.master_addr or "127.0.0.1", args.master_port, args.nnodes or 1, args.node_rank or 0,
                    args.tensor_parallel_size, args.pipeline_parallel_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orca-serve", description="Iteration-level LLM serving (Orca).")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info for serve (one line per request), warning otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print it")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=integer, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=integer, default=0)
    gen.add_argument("--seed-sampling", type=integer, default=None, help="sampling seed")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap the prompt in the model's chat template (default: on)")
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    from orca_serve.entrypoints.openai.args import add_server_args

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_server_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=_cmd_serve)

    wrk = sub.add_parser("worker", help="start the worker ranks of node --node-rank (>0) of a multi-node engine; "
                         "the driver (serve/generate with the same --nnodes/--master-*) runs on node 0")
    add_engine_args(wrk)  # the driver's command line is accepted as is; model, T and P come from the driver
    wrk.set_defaults(func=_cmd_worker)

    try:
        from orca_serve.bench.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command == "serve" else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"orca-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
