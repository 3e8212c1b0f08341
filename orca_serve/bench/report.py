"""Printing results: one run's summary table, and ``bench compare``.

``compare`` answers Orca's question, "how much more load at the same
latency?": for each curve (runs of one label over request rates) it finds the
highest throughput at which median normalized latency stays within a bound,
interpolating linearly between measured points, and divides.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict

from orca_serve.bench.machine import cpus_of, mixed_cpus_warning


# (metric key, short name, section title)
_DISTS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
          ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"),
          ("normalized_latency", "norm. latency", "Normalized Latency (latency / output tokens)"))


def _f(x, digits=2) -> str:
    if x is None:
        return "-"
    if not isinstance(x, float):
        return str(x)
    return f"{x:.{digits}f}" if x == 0 or abs(x) >= 0.1 else f"{x:.3g}"


def print_run(run: dict, out=print) -> None:
    m = run["metrics"]
    out(f"{' ' + run['label'] + ' @ ' + str(run['request_rate']) + ' req/s ':=^60}")
    rows = [("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
            ("Benchmark duration (s)", m["duration_s"]), ("Total input tokens", m["total_input_tokens"]),
            ("Total generated tokens", m["total_output_tokens"]),
            ("Request throughput (req/s)", m["request_throughput"]),
            ("Output token throughput (tok/s)", m["output_throughput"]),
            ("Total token throughput (tok/s)", m["total_token_throughput"])]
    if m.get("request_goodput") is not None:
        rows += [("SLO attainment (%)", 100.0 * m["slo_attainment"]),
                 ("Request goodput (req/s)", m["request_goodput"])]
    for key, short, title in _DISTS:
        rows.append((f"--{title}", None))
        rows += [(f"{stat.capitalize()} {short} (ms{'/token' if key == 'normalized_latency' else ''})",
                  m[f"{stat}_{key}_ms"])
                 for stat in ("mean", "median", "p90", "p99")]
    stats = run.get("backend_stats") or {}
    if stats:
        rows.append(("--Backend", None))
        rows += [(k, v) for k, v in stats.items() if not isinstance(v, dict)]
        rows += [(f"{k}[{kk}]", vv) for k, v in stats.items() if isinstance(v, dict) for kk, vv in v.items()]
    for name, value in rows:
        out(f"{name[2:]:-^60}" if name.startswith("--") else f"{name + ':':<44}{_f(value):>16}")
    out("=" * 60)


def print_sweep(result: dict, out=print) -> None:
    """One line per run: the points of the paper's figure."""
    out(f"{'label':<16}{'rate':>8}{'req/s':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TPOT p50':>10}"
        f"{'norm p50':>10}{'SLO %':>7}")
    for run in result["runs"]:
        m = run["metrics"]
        slo = None if m["slo_attainment"] is None else 100.0 * m["slo_attainment"]
        out(f"{run['label'][:15]:<16}{str(run['request_rate']):>8}{_f(m['request_throughput']):>9}"
            f"{_f(m['output_throughput']):>11}{_f(m['median_ttft_ms']):>10}{_f(m['median_tpot_ms']):>10}"
            f"{_f(m['median_normalized_latency_ms']):>10}{_f(slo, 1):>7}")


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not an orca-serve bench result (not JSON: {e})") from None
    if not isinstance(data, dict) or "runs" not in data:
        raise ValueError(f"{path}: not an orca-serve bench result (no 'runs')")
    runs = data["runs"]
    if (not isinstance(runs, list) or not runs
            or not all(isinstance(r, dict) and isinstance(r.get("metrics"), dict) and "label" in r for r in runs)):
        raise ValueError(f"{path}: not an orca-serve bench result ('runs' is not a list of runs with a label "
                         f"and metrics)")
    return data


def _points(runs: list[dict]) -> list[tuple[float, float]]:
    """[(request throughput, median normalized latency ms)] sorted by throughput."""
    return sorted((r["metrics"]["request_throughput"], r["metrics"]["median_normalized_latency_ms"])
                  for r in runs if r["metrics"]["median_normalized_latency_ms"] is not None)


def curves(data: dict) -> dict[str, list[tuple[float, float]]]:
    """label -> its (throughput, median normalized latency) points."""
    groups = defaultdict(list)
    for run in data["runs"]:
        groups[run["label"]].append(run)
    return {label: _points(runs) for label, runs in groups.items()}


def throughput_at_latency(points: list[tuple[float, float]], bound: float) -> tuple[float | None, bool]:
    """Highest throughput whose (interpolated) latency is <= bound.

    Returns (throughput, is_lower_bound). ``is_lower_bound`` is True when the
    curve never reached the bound, so its capacity is at least its last point.
    None when even the lightest load was over the bound.
    """
    pts = sorted(points)
    best = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 <= bound:
            best = x0 if best is None else max(best, x0)
            if y1 > bound:  # the curve crosses the bound inside this segment
                best = max(best, x0 + (x1 - x0) * (bound - y0) / (y1 - y0))
    if pts and pts[-1][1] <= bound:
        return pts[-1][0] if best is None else max(best, pts[-1][0]), True
    return best, False


def capacity_ratios(cand: list, base: list) -> list[dict]:
    """At each latency the baseline measured: candidate's capacity / baseline's capacity."""
    rows = []
    for _, bound in sorted(base, key=lambda p: p[1]):
        b, b_lb = throughput_at_latency(base, bound)
        c, c_lb = throughput_at_latency(cand, bound)
        ratio = None if not b or c is None else c / b
        rows.append({"normalized_latency_ms": bound, "candidate_req_s": c, "baseline_req_s": b,
                     "ratio": ratio, "ratio_is_lower_bound": bool(c_lb and not b_lb)})
    return rows


def slo_at_baseline_low(cand: list[dict], base_by_rate: dict[str, dict], at_most: float = 0.42) -> dict | None:
    """The performance issue's SLO clause: at the lightest load where the
    baseline meets the SLO for at most ``at_most`` of its requests (the Orca
    paper's 42%), the share the candidate meets there.

    ``base_by_rate``: the baseline's runs by rate, as ``compare`` pairs
    them. Rates both curves ran with an SLO only. Returns {"rate",
    "baseline", "candidate", "reached", "at_most"}, where ``reached`` False
    means the baseline never fell that low, and the rate is then where it
    came lowest (the lightest such); None when no rate has an attainment on
    both sides.
    """
    shared = []  # (rate, baseline's share, candidate's share)
    for r in cand:
        other = base_by_rate.get(str(r["request_rate"]))
        b = None if other is None else other["metrics"].get("slo_attainment")
        c = r["metrics"].get("slo_attainment")
        if b is not None and c is not None:
            shared.append((float(r["request_rate"]), b, c))  # "inf" (all at once) sorts last
    shared.sort()
    if not shared:
        return None
    low = next((row for row in shared if row[1] <= at_most), None)
    rate, b, c = low if low is not None else min(shared, key=lambda row: row[1])
    return {"rate": rate, "baseline": b, "candidate": c, "reached": low is not None, "at_most": at_most}


_HEADLINE = ("request_throughput", "output_throughput", "total_token_throughput", "median_ttft_ms",
             "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "median_normalized_latency_ms",
             "p99_normalized_latency_ms", "slo_attainment", "request_goodput")


def metric_ratios(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    rows = []
    for k in _HEADLINE:
        va, vb = a.get(k), b.get(k)
        rows.append((k, va, vb, va / vb if va is not None and vb else None))
    return rows


def group_runs(paths: list[str]) -> dict[str, list[dict]]:
    """Runs of all files by label; a label found in several files is suffixed with its file."""
    per_file = [(p, load(p)["runs"]) for p in paths]
    counts = defaultdict(set)
    for p, runs in per_file:
        for r in runs:
            counts[r["label"]].add(p)
    groups = defaultdict(list)
    for p, runs in per_file:
        for r in runs:
            groups[r["label"] if len(counts[r["label"]]) == 1 else f"{r['label']} ({p})"].append(r)
    return dict(groups)


def median_runs(paths: list[str]) -> dict[str, list[dict]]:
    """Repeated runs as one: per label and request rate, every numeric metric is
    the median over the files that hold that run (``repeats`` says how many).
    ``rounds`` keeps each repeat's start (its file's ``created``, "" if
    none) and own metrics, in the order the repeats started (then by
    path), for ``paired_ratios``."""
    by_key: dict[tuple[str, str], list[tuple[tuple[str, str], dict]]] = defaultdict(list)
    for p in paths:
        data = load(p)
        started = (str(data.get("created") or ""), p)
        for r in data["runs"]:
            by_key[(r["label"], str(r["request_rate"]))].append((started, r))
    groups = defaultdict(list)
    for (label, _), found in by_key.items():
        runs = [r for _, r in found]
        metrics = {}
        for k in runs[0]["metrics"]:
            values = [r["metrics"].get(k) for r in runs]
            numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            metrics[k] = statistics.median(numeric) if len(numeric) == len(values) else values[0]
        rounds = [{"created": started[0], "metrics": r["metrics"]}
                  for started, r in sorted(found, key=lambda f: f[0])]
        groups[label].append({**runs[0], "metrics": metrics, "repeats": len(runs), "requests": [], "rounds": rounds})
    return dict(groups)


def paired_ratios(cand_rounds: list[dict], base_rounds: list[dict]) -> dict:
    """The candidate's repeats against the baseline's, round by round.

    ``scripts/bench_all.sh`` alternates the systems within each round, so
    the i-th repeats of two sides (in the order they started) ran minutes
    apart, while the first and last rounds can be a slower or faster host
    apart: on this project's shared 2-core machine one sitting's runs fell
    from 1,046 to 818 tok/s. Each side's own median can then come from
    different rounds (ours from round 2, the baseline's from round 1); the
    median of the per-round ratios compares runs that shared their minutes.

    Rounds are ``median_runs``' (start, metrics). Returns {"pairs": n,
    "alternated": whether both runs of each pair started before either of
    the next pair's (None: a file records no start), "metrics": {metric:
    {"ratios": [...], "median": m}}} (each pair's ratios by
    ``metric_ratios``), or {"unpaired": why} when the sides' repeat counts
    differ or there is one.
    """
    if len(cand_rounds) != len(base_rounds) or len(cand_rounds) < 2:
        return {"unpaired": f"{len(cand_rounds)} run(s) against {len(base_rounds)}: rounds pair only when "
                            f"both sides have the same number, two or more"}
    starts = [(c["created"], b["created"]) for c, b in zip(cand_rounds, base_rounds)]
    alternated = (None if not all(c and b for c, b in starts)
                  else all(max(now) < min(later) for now, later in zip(starts, starts[1:])))
    per_pair = [metric_ratios(c["metrics"], b["metrics"]) for c, b in zip(cand_rounds, base_rounds)]
    metrics = {}
    for i, (k, *_) in enumerate(per_pair[0]):
        ratios = [rows[i][3] for rows in per_pair]
        if None not in ratios:
            metrics[k] = {"ratios": ratios, "median": statistics.median(ratios)}
    return {"pairs": len(cand_rounds), "alternated": alternated, "metrics": metrics}


def compare(paths: list[str], baseline: str | None = None, out=print, median: bool = False) -> dict:
    """Print every curve against the baseline curve (default: the last file's first label).

    ``median``: files are repeats; runs with the same label and rate are merged
    into their per-metric medians (``median_runs``) before comparing, and
    the repeats are also compared round by round (``paired_ratios``)."""
    groups = median_runs(paths) if median else group_runs(paths)
    mixed = mixed_cpus_warning(cpus_of({p: load(p) for p in paths}))
    if mixed:
        out(mixed)
    if median:
        for label, runs in groups.items():
            out(f"{label}: median of {', '.join(str(r['repeats']) for r in runs)} run(s) per rate")
    if baseline is None:
        last = load(paths[-1])["runs"][0]["label"]
        baseline = last if last in groups else f"{last} ({paths[-1]})"
    if baseline not in groups:
        raise ValueError(f"baseline {baseline!r} not among the curves: {', '.join(groups)}")
    report = {"baseline": baseline, "capacity": {}, "slo_at_baseline_low": {}, "metrics": {}, "mixed_cpus": mixed}
    if median:
        report["paired"] = {}
    base_pts = _points(groups[baseline])
    base_by_rate = {str(r["request_rate"]): r for r in groups[baseline]}
    for label, runs in groups.items():
        if label == baseline:
            continue
        cap = capacity_ratios(_points(runs), base_pts)
        report["capacity"][label] = cap
        out(f"== {label} vs {baseline}: request throughput at equal median normalized latency ==")
        out(f"{'latency ms/tok':>15}{label[:14]:>15}{baseline[:14]:>15}{'ratio':>10}")
        for row in cap:
            ratio = "-" if row["ratio"] is None else \
                ((">=" if row["ratio_is_lower_bound"] else "") + f"{row['ratio']:.2f}x")
            out(f"{row['normalized_latency_ms']:>15.2f}{_f(row['candidate_req_s'], 3):>15}"
                f"{_f(row['baseline_req_s'], 3):>15}{ratio:>10}")
        slo = slo_at_baseline_low(runs, base_by_rate)
        if slo is not None:
            report["slo_at_baseline_low"][label] = slo
            _print_slo(slo, label, baseline, out)
        for run in runs:
            other = base_by_rate.get(str(run["request_rate"]))
            if other is None and len(runs) == 1 and len(groups[baseline]) == 1:
                other = groups[baseline][0]  # two single runs: compare them whatever their rates
            if other is None:
                continue
            rows = metric_ratios(run["metrics"], other["metrics"])
            report["metrics"][f"{label} @ {run['request_rate']}"] = {k: r for k, _, _, r in rows}
            out(f"-- {label} @ {run['request_rate']} vs {baseline} @ {other['request_rate']} req/s --")
            out(f"{'metric':<32}{label[:14]:>14}{baseline[:14]:>14}{'ratio':>10}")
            for k, va, vb, r in rows:
                out(f"{k:<32}{_f(va):>14}{_f(vb):>14}{_f(r) + ('x' if r is not None else ''):>10}")
            if median:
                paired = paired_ratios(run["rounds"], other["rounds"])
                report["paired"][f"{label} @ {run['request_rate']}"] = paired
                _print_paired(paired, label, baseline, out)
    return report


def _print_slo(slo: dict, label: str, baseline: str, out) -> None:
    shares = f"{baseline} {100 * slo['baseline']:.0f}%, {label} {100 * slo['candidate']:.0f}%"
    bound = f"{100 * slo['at_most']:.0f}%"
    if slo["reached"]:
        out(f"SLO attainment at the lightest load where {baseline} meets the SLO for at most {bound} of "
            f"requests ({slo['rate']:g} req/s): {shares}")
    else:
        out(f"SLO attainment: {baseline}'s never fell to {bound} or below; at its lowest "
            f"({slo['rate']:g} req/s): {shares}")


def _print_paired(paired: dict, label: str, baseline: str, out) -> None:
    if "unpaired" in paired:
        out(f"-- {label} vs {baseline} not paired by round: {paired['unpaired']} --")
        return
    out(f"-- {label} vs {baseline}, paired by round ({paired['pairs']} pairs, each side's repeats in the "
        f"order they started) --")
    if paired["alternated"] is False:
        out("NOTE: the two sides' runs did not alternate (a round of one side started before the other's "
            "previous round), so a pair's runs need not have shared the host's minutes; these ratios pair "
            "them by order alone")
    out(f"{'metric':<32}{'ratio by round':>24}{'median':>10}")
    for k, m in paired["metrics"].items():
        out(f"{k:<32}{' / '.join(_f(r) for r in m['ratios']):>24}{_f(m['median']) + 'x':>10}")
