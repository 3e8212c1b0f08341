"""A model runner stand-in for scheduler tests: no torch.

It mirrors the real worker's bookkeeping (it rebuilds each request's tokens
and block table from the SchedulerOutput diffs) and checks that the diffs are
consistent. Its "KV cache" stores the token id at every slot, and it samples
from what the cache holds, so a wrong block table, a prefix-cache hit on the
wrong block or a botched swap changes the output. The next token depends only
on the request's tokens, so outputs are the same whatever the batch.
"""
from __future__ import annotations

from orca_serve.batch import ModelRunnerOutput, SchedulerOutput


def next_token(tokens: list[int], vocab: int = 1000) -> int:
    return (tokens[-1] * 31 + len(tokens) * 7) % vocab


class FakeRunner:
    def __init__(self, block_size: int, vocab: int = 1000, strict: bool = True) -> None:
        """``strict``: a request that reads K/V other than its tokens fails the
        test at once. Otherwise it samples a token no reference output holds,
        as a real model computes on garbage, and is recorded in ``read_bad``:
        with batches in flight a request may be failed by the scheduler after
        a batch behind its failed one has already read for it."""
        self.block_size = block_size
        self.vocab = vocab
        self.strict = strict
        self.read_bad: set[str] = set()
        self.state: dict[str, dict] = {}
        self.iterations = 0
        self.gpu_kv: dict[int, list] = {}
        self.cpu_kv: dict[int, list] = {}

    def batch_failed(self, so: SchedulerOutput) -> None:
        """``so`` failed before it ran (no copies, no tokens): like the real
        runner, forget the requests it was to drop."""
        for rid in so.finished_req_ids:
            self.state.pop(rid, None)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.iterations += 1
        for rid in so.finished_req_ids:
            self.state.pop(rid, None)
        for slot, block in so.blocks_to_swap_out:
            self.cpu_kv[slot] = list(self.gpu_kv.get(block, [None] * self.block_size))
        for slot, block in so.blocks_to_swap_in:
            # A slot no swap-out wrote holds garbage, as on a real host pool.
            self.gpu_kv[block] = list(self.cpu_kv.pop(slot, [None] * self.block_size))
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.state, f"{new.req_id} sent as new twice"
            self.state[new.req_id] = {"tokens": list(new.prompt_token_ids) + list(new.output_token_ids),
                                      "blocks": list(new.block_ids), "computed": new.num_computed_tokens}
        for cached in so.scheduled_cached_reqs:
            st = self.state[cached.req_id]
            st["tokens"].extend(cached.new_token_ids)
            st["blocks"].extend(cached.new_block_ids)
            assert st["computed"] == cached.num_computed_tokens, "worker and scheduler disagree on progress"
        sampled = {}
        for rid, n in so.num_scheduled_tokens.items():
            st = self.state[rid]
            end = st["computed"] + n
            assert 0 < n and end <= len(st["tokens"]), f"{rid}: scheduled past its known tokens"
            assert len(st["blocks"]) * self.block_size >= end, f"{rid}: block table too short"
            assert len(set(st["blocks"])) == len(st["blocks"]), f"{rid}: duplicate block in table"
            bs = self.block_size
            for pos in range(st["computed"], end):
                self.gpu_kv.setdefault(st["blocks"][pos // bs], [None] * bs)[pos % bs] = st["tokens"][pos]
            st["computed"] = end
            if end == len(st["tokens"]):
                unwritten = [None] * bs
                seen = [self.gpu_kv.get(st["blocks"][p // bs], unwritten)[p % bs] for p in range(end)]
                if seen != st["tokens"][:end]:
                    assert not self.strict, f"{rid}: KV cache holds the wrong tokens"
                    self.read_bad.add(rid)
                    sampled[rid] = self.vocab  # outside every reference output
                    continue
                sampled[rid] = next_token(seen, self.vocab)
        return ModelRunnerOutput(sampled_token_ids=sampled)


def reference_output(prompt: list[int], max_tokens: int, vocab: int = 1000) -> list[int]:
    """What a request produces alone with the fake model (ignore_eos)."""
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(tokens, vocab)
        tokens.append(t)
        out.append(t)
    return out


def replay_ops(s, ops, make_request, step_fn, check=None, runner: FakeRunner | None = None) -> list:
    """Apply a property test's random ops to scheduler ``s``: ("add", ...) builds a
    request with ``make_request(op, index)`` (requests the scheduler refuses are
    skipped), ("abort", i) aborts an added one, ("step", n) runs n iterations,
    ("fail", _) schedules one that fails before it runs. Returns the requests
    that were added."""
    added = []
    for op in ops:
        if op[0] == "add":
            q = make_request(op, len(added))
            try:
                s.add_request(q)
            except ValueError:
                continue
            added.append(q)
        elif op[0] == "abort" and added:
            s.abort_request(added[op[1] % len(added)].request_id)
        elif op[0] == "fail":
            so = s.schedule()
            runner.batch_failed(so)
            s.fail_batch(so, "injected failure")
        else:
            for _ in range(op[1]):
                step_fn()
        if check is not None:
            check(s)
    return added
