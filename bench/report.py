#!/usr/bin/env python3
"""Turns the raw results of bench/compare.sh into Markdown: `report.py RESULTS_DIR OUT.md`.

Every run left RESULTS_DIR/<case>.<server>.<run>.json (the bench's report line) and
<case>.<server>.<run>.meta.json (exit code, server RSS before the run). For each case and server
the median of each metric over the runs is shown, then each target of issue 8 is checked with
ratios taken from the same runs. The text goes between the markers
`<!-- compare:begin -->` and `<!-- compare:end -->` of OUT (appended if they are missing), so
the hand-written parts of the page stay."""

import glob
import json
import os
import statistics
import sys

BEGIN = "<!-- compare:begin -->"
END = "<!-- compare:end -->"

SERVER_ORDER = ["faye", "memory", "disk", "hyper", "floor"]
SERVER_NAME = {
    "faye": "Faye 1.4.3",
    "memory": "bayeux (memory)",
    "disk": "bayeux (disk)",
    "hyper": "bare hyper",
    "floor": "floor (system calls only)",
}
CASE_ORDER = ["fanout", "throughput", "many", "idle-lp", "idle-ws", "roundtrips",
              "ws-fanout", "ws-throughput", "ws-many"]
CASE_TEXT = {
    "fanout": "fan-out: 1,000 long-poll subscribers, 10 channels, 200 msg/s",
    "throughput": "throughput: 100 long-poll subscribers, 1 channel, 64 publishes in flight",
    "many": "many clients: 10,000 long-poll subscribers, 100 channels, 1 msg/s each",
    "idle-lp": "idle scale, long-polling",
    "idle-ws": "idle scale, WebSocket",
    "roundtrips": "round trips: empty publishes, 50 connections",
    "ws-fanout": "WebSocket fan-out",
    "ws-throughput": "WebSocket throughput",
    "ws-many": "WebSocket many clients: 10,000 subscribers, 1 msg/s each",
}


def load(results):
    runs = {}
    for path in sorted(glob.glob(os.path.join(results, "*.meta.json"))):
        with open(path) as f:
            meta = json.load(f)
        body = path[: -len(".meta.json")] + ".json"
        report = None
        try:
            with open(body) as f:
                line = f.read().strip()
            report = json.loads(line) if line else None
        except (OSError, ValueError):
            report = None
        cmd = None
        try:
            with open(path[: -len(".meta.json")] + ".cmd") as f:
                cmd = f.read().strip()
        except OSError:
            pass
        runs.setdefault((meta["case"], meta["server"]), []).append((meta, report, cmd))
    return runs


def metrics(meta, r):
    """The numbers of one run, or None when the bench produced no report."""
    if r is None:
        return None
    server = r.get("server") or {}
    bench = r.get("bench") or {}
    clients = (r.get("subscribers_ready") or 0) + (r.get("publishers_ready") or 0)
    rss_kb = (server.get("rss_mb") or 0) * 1024
    base = meta.get("base_rss_kb") or 0
    cpu = server.get("cpu_percent")
    dps = r.get("deliveries_per_sec") or 0
    return {
        "deliveries": dps,
        "publishes": nan_if_none(r.get("publishes_per_sec", 0)),
        # The floor times nothing per message: no latencies.
        "p50": nan_if_none(r["latency_ms"]["p50"]),
        "p99": nan_if_none(r["latency_ms"]["p99"]),
        "cpu": cpu if cpu is not None else float("nan"),
        "rss": server.get("rss_mb", float("nan")),
        "lost": r.get("lost", 0),
        "dup": r.get("duplicated", 0),
        "errors": sum((r.get("errors") or {}).values()),
        "error_kinds": r.get("errors") or {},
        "bench_cpu": bench.get("cpu_percent", float("nan")),
        "clients": clients,
        "subs": r.get("subscribers_ready") or 0,
        "kb_per_client": (rss_kb - base) / clients if clients else float("nan"),
        "cpu_us_per_delivery": (cpu / 100 * 1e6 / dps) if (cpu and dps) else float("nan"),
        "aborted": r.get("aborted"),
        "duration": (r.get("params") or {}).get("duration"),
        "exit": meta.get("exit"),
    }


def nan_if_none(v):
    return float("nan") if v is None else v


def median(values):
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def summarize(runs):
    out = {}
    for key, items in runs.items():
        ms = [metrics(meta, r) for meta, r, _ in items]
        good = [m for m in ms if m is not None]
        if not good:
            out[key] = {"n": 0, "failed": len(ms), "cmd": items[0][2]}
            continue
        s = {k: median([m[k] for m in good]) for k in good[0]
             if isinstance(good[0][k], (int, float)) and k not in ("aborted", "exit")}
        s["lost"] = max(m["lost"] for m in good)
        s["dup"] = max(m["dup"] for m in good)
        s["errors"] = max(m["errors"] for m in good)
        kinds = {}
        for m in good:
            for k, v in m["error_kinds"].items():
                kinds[k] = max(kinds.get(k, 0), v)
        s["error_kinds"] = kinds
        s["n"] = len(good)
        s["failed"] = len(ms) - len(good)
        s["aborted"] = [m["aborted"] for m in good if m["aborted"]]
        s["cmd"] = items[0][2]
        out[key] = s
    return out


def fmt(v, digits=0):
    if v is None or v != v:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or a != a or b != b or b == 0:
        return float("nan")
    return a / b


def verdict(ok):
    if isinstance(ok, str):
        return ok
    if ok is None:
        return "n/a"
    return "**met**" if ok else "**not met**"


def results_table(summary, cases):
    lines = [
        "| case | server | runs | deliveries/s | publishes/s | p50 ms | p99 ms | server CPU % | "
        "server RSS MB | lost / dup | errors | bench CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for server in SERVER_ORDER:
            s = summary.get((case, server))
            if s is None:
                continue
            if s["n"] == 0:
                lines.append(f"| {case} | {SERVER_NAME[server]} | 0 of {s['failed']} | "
                             "no report | | | | | | | | |")
                continue
            errs = fmt(s["errors"])
            if s["error_kinds"]:
                errs += " (" + ", ".join(f"{k} {v}" for k, v in sorted(s["error_kinds"].items())) + ")"
            lines.append(
                f"| {case} | {SERVER_NAME[server]} | {s['n']} | {fmt(s['deliveries'])} | "
                f"{fmt(s['publishes'])} | {fmt(s['p50'], 2)} | {fmt(s['p99'], 2)} | "
                f"{fmt(s['cpu'], 1)} | {fmt(s['rss'], 1)} | {fmt(s['lost'])} / {fmt(s['dup'])} | "
                f"{errs} | {fmt(s['bench_cpu'], 1)} |")
    return lines


def targets_table(summary):
    """One row per target of issue 8, checked on the memory engine (disk shown alongside)."""
    g = lambda c, s, k: (summary.get((c, s)) or {}).get(k, float("nan"))
    rows = []

    def engines(case):
        return [e for e in ("memory", "disk") if (case, e) in summary]

    def cpu_row(case, label):
        for engine in engines(case):
            r = ratio(g(case, engine, "cpu"), g(case, "faye", "cpu"))
            rows.append((case, engine, f"{label} CPU ≤ ¼ of Faye's",
                         f"{fmt(g(case, engine, 'cpu'), 1)} % vs {fmt(g(case, 'faye', 'cpu'), 1)} %",
                         fmt(r, 2), None if r != r else r <= 0.25))
        # The floor: the same deliveries with nothing but their system calls. Above a quarter of
        # Faye's CPU, no server that sends each delivery on its subscriber's connection can meet
        # the target on this machine.
        r = ratio(g(case, "floor", "cpu"), g(case, "faye", "cpu"))
        if r == r:
            rows.append((case, "floor", "the system calls alone, against ¼ of Faye's CPU",
                         f"{fmt(g(case, 'floor', 'cpu'), 1)} % vs {fmt(g(case, 'faye', 'cpu'), 1)} %",
                         fmt(r, 2), "target below the floor" if r > 0.25 else "target above the floor"))

    def rss_row(case):
        for engine in engines(case):
            r = ratio(g(case, engine, "rss"), g(case, "faye", "rss"))
            rows.append((case, engine, "RSS ≤ ⅕ of Faye's",
                         f"{fmt(g(case, engine, 'rss'), 1)} MB vs {fmt(g(case, 'faye', 'rss'), 1)} MB",
                         fmt(r, 2), None if r != r else r <= 0.2))

    def p99_row(case, limit):
        for engine in engines(case):
            v = g(case, engine, "p99")
            rows.append((case, engine, f"p99 ≤ {limit} ms",
                         f"{fmt(v, 2)} ms (Faye {fmt(g(case, 'faye', 'p99'), 2)} ms)", "",
                         None if v != v else v <= limit))

    def lost_row(case):
        for engine in ("memory", "disk"):
            s = summary.get((case, engine))
            if s and s.get("n"):
                rows.append((case, engine, "0 lost", f"{fmt(s['lost'])} lost, {fmt(s['dup'])} dup", "",
                             s["lost"] == 0))

    def tput_row(case, key, factor, label):
        for engine in engines(case):
            r = ratio(g(case, engine, key), g(case, "faye", key))
            rows.append((case, engine, label,
                         f"{fmt(g(case, engine, key))}/s vs {fmt(g(case, 'faye', key))}/s",
                         fmt(r, 2), None if r != r else r >= factor))

    if ("fanout", "memory") in summary:
        lost_row("fanout")
        cpu_row("fanout", "")
        p99_row("fanout", 10)
    if ("throughput", "memory") in summary:
        tput_row("throughput", "deliveries", 3, "deliveries ≥ 3 × Faye")
    if ("many", "memory") in summary:
        cpu_row("many", "")
        rss_row("many")
    for case, limit in (("idle-lp", 8), ("idle-ws", 4)):
        for server in ("memory", "disk", "faye"):
            s = summary.get((case, server))
            if not s or not s.get("n"):
                continue
            ok = None
            if server != "faye":
                ok = s["errors"] == 0 and s["kb_per_client"] <= limit
            rows.append((case, server, f"{fmt(s['subs'])} held, 0 errors, ≤ {limit} KB per idle client",
                         f"{fmt(s['subs'])} held, {fmt(s['errors'])} errors, "
                         f"{fmt(s['kb_per_client'], 1)} KB/client", "", ok))
    if ("roundtrips", "memory") in summary:
        tput_row("roundtrips", "publishes", 2.5, "publishes ≥ 2.5 × Faye")
        for engine in engines("roundtrips"):
            r = ratio(g("roundtrips", engine, "publishes"), g("roundtrips", "hyper", "publishes"))
            rows.append(("roundtrips", engine, "within 20 % of bare hyper",
                         f"{fmt(g('roundtrips', engine, 'publishes'))}/s vs "
                         f"{fmt(g('roundtrips', 'hyper', 'publishes'))}/s", fmt(r, 2),
                         None if r != r else r >= 0.8))
    if ("ws-fanout", "memory") in summary:
        lost_row("ws-fanout")
        cpu_row("ws-fanout", "")
        p99_row("ws-fanout", 2)
    if ("ws-throughput", "memory") in summary:
        tput_row("ws-throughput", "deliveries", 3, "deliveries ≥ 3 × Faye")
    if ("ws-many", "memory") in summary:
        cpu_row("ws-many", "")
        rss_row("ws-many")
    # Durable: the disk engine against the memory engine in the same runs.
    for case in ("fanout", "throughput", "ws-fanout", "ws-throughput"):
        if (case, "disk") not in summary or (case, "memory") not in summary:
            continue
        if "throughput" in case:
            r = ratio(g(case, "disk", "deliveries"), g(case, "memory", "deliveries"))
            detail = f"{fmt(g(case, 'disk', 'deliveries'))}/s vs {fmt(g(case, 'memory', 'deliveries'))}/s"
        else:
            # The rate is fixed: compare the work each delivery costs (memory CPU / disk CPU).
            r = ratio(g(case, "memory", "cpu"), g(case, "disk", "cpu"))
            detail = (f"CPU {fmt(g(case, 'disk', 'cpu'), 1)} % vs {fmt(g(case, 'memory', 'cpu'), 1)} %, "
                      f"{fmt(g(case, 'disk', 'lost'))} lost")
        rows.append((case, "disk", "durable: ≥ 80 % of the memory engine", detail, fmt(r, 2),
                     None if r != r else r >= 0.8))
    lines = ["| case | server | target | measured (median) | ratio | verdict |",
             "|---|---|---|---|---|---|"]
    for case, server, target, measured, r, ok in rows:
        lines.append(f"| {case} | {SERVER_NAME[server]} | {target} | {measured} | {r} | {verdict(ok)} |")
    return lines


def sweep_tables(summary):
    lines = []
    subs = sorted({int(c[len("sweep-subs-"):]) for c, _ in summary if c.startswith("sweep-subs-")})
    if subs:
        lines += ["", "#### Subscribers (long-polling, 100 channels, 1 msg/s per subscriber)", "",
                  "| server | subscribers | deliveries/s | server CPU % | CPU µs per delivery | "
                  "RSS MB | KB per client | p99 ms | lost | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for server in SERVER_ORDER:
            for n in subs:
                s = summary.get((f"sweep-subs-{n}", server))
                if not s or not s.get("n"):
                    continue
                lines.append(f"| {SERVER_NAME[server]} | {fmt(s['subs'])} | {fmt(s['deliveries'])} | "
                             f"{fmt(s['cpu'], 1)} | {fmt(s['cpu_us_per_delivery'], 2)} | "
                             f"{fmt(s['rss'], 1)} | {fmt(s['kb_per_client'], 1)} | {fmt(s['p99'], 2)} | "
                             f"{fmt(s['lost'])} | {fmt(s['errors'])} |")
    chans = sorted({int(c[len("sweep-channels-"):]) for c, _ in summary
                    if c.startswith("sweep-channels-")})
    if chans:
        lines += ["", "#### Channels (the fan-out case plus S idle subscriptions on S other channels)",
                  "", "| server | channels with subscribers | deliveries/s | server CPU % | "
                  "CPU µs per delivery | RSS MB | p50 ms | p99 ms | lost |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for server in SERVER_ORDER:
            for n in chans:
                s = summary.get((f"sweep-channels-{n}", server))
                if not s or not s.get("n"):
                    continue
                lines.append(f"| {SERVER_NAME[server]} | {fmt(10 + n)} | {fmt(s['deliveries'])} | "
                             f"{fmt(s['cpu'], 1)} | {fmt(s['cpu_us_per_delivery'], 2)} | "
                             f"{fmt(s['rss'], 1)} | {fmt(s['p50'], 2)} | {fmt(s['p99'], 2)} | "
                             f"{fmt(s['lost'])} |")
    return lines


def main():
    results, out = sys.argv[1], sys.argv[2]
    runs = load(results)
    summary = summarize(runs)
    cases = [c for c in CASE_ORDER if any(k[0] == c for k in summary)]
    machine = ""
    try:
        with open(os.path.join(results, "machine.txt")) as f:
            machine = f.read().strip()
    except OSError:
        pass
    body = [BEGIN, "",
            f"Generated by `bench/compare.sh` from `{os.path.relpath(results)}` "
            "(medians over the runs; ratios from the same runs).", "",
            "```text", machine, "```", ""]
    if cases:
        body += ["### Targets", ""] + targets_table(summary) + [""]
        body += ["### Every case (medians)", ""] + results_table(summary, cases) + [""]
        body += ["Exact bench flags per case (each run also adds `--url`, `--warmup`, `--duration`, "
                 "`--grace`, `--server-pid`, `--no-progress`):", "", "```text"]
        for case in cases:
            for server in SERVER_ORDER:
                s = summary.get((case, server))
                if s and s.get("cmd"):
                    body.append(f"{case} ({server}): {s['cmd']}")
        body += ["```", ""]
    sweep = sweep_tables(summary)
    if sweep:
        body += ["### Sweeps"] + sweep + [""]
    body.append(END)
    text = "\n".join(body) + "\n"
    existing = ""
    if os.path.exists(out):
        with open(out) as f:
            existing = f.read()
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = head + text.rstrip("\n") + tail
    else:
        new = (existing.rstrip("\n") + "\n\n" if existing else "# Benchmarks\n\n") + text
    with open(out, "w") as f:
        f.write(new)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
