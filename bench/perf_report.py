#!/usr/bin/python3
"""perf_report.py: turn bench/profile's perf recordings into profile.md.

Usage: perf_report.py SYSTEM_DIR WALPIPE_DIR OUT.md
  SYSTEM_DIR   a bench.py --perf system output dir (results.json + perf/*-system.data):
               whole-machine samples, split by the pids of the walpipe process, its
               walsender and its staging backend
  WALPIPE_DIR  a bench.py --perf walpipe output dir (perf/*-walpipe.data): the walpipe
               process alone with DWARF call graphs, broken down by what the time is for
"""

import json
import re
import subprocess
import sys
from pathlib import Path

LINE = re.compile(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(.+?)\s*$")
SELF_LINE = re.compile(r"^\s+([\d.]+)%\s+(.+?)\s*$")


def perf(*args):
    r = subprocess.run(["perf", "report", "--stdio", *args], capture_output=True, text=True)
    return r.stdout


def system_samples(data):
    """[(percent, tid, comm, dso, sym)] of a system-wide recording, one row per (tid, dso, sym)."""
    rows = []
    for line in perf("-i", str(data), "--sort", "pid,dso,sym", "-t", "|").splitlines():
        if line.startswith("#") or "|" not in line:
            continue
        f = [x.strip() for x in line.split("|")]
        if len(f) < 4 or not f[0].endswith("%"):
            continue
        tid, _, comm = f[1].partition(":")
        sym = re.sub(r"^\[[.k]\]\s*", "", f[3])
        rows.append((float(f[0].rstrip("%")), int(tid), comm, f[2], sym))
    return rows


def role_view(rows, tids):
    """(total %, [(pct of role, dso)], [(pct of role, dso, sym)]) for the samples of tids."""
    mine = [r for r in rows if r[1] in tids]
    total = sum(r[0] for r in mine)
    if not total:
        return 0.0, [], []
    dsos = {}
    for r in mine:
        dsos[r[3]] = dsos.get(r[3], 0.0) + r[0]
    dso_rows = sorted(((100 * v / total, d) for d, v in dsos.items()), reverse=True)
    sym_rows = sorted(((100 * r[0] / total, r[3], r[4]) for r in mine), reverse=True)
    return total, dso_rows, sym_rows


def inclusive(data):
    """{symbol: (children %, self %)} of a call-graph recording."""
    out = {}
    for line in perf("-i", str(data), "--children", "--sort", "sym", "-g", "none").splitlines():
        m = LINE.match(line)
        if m:
            sym = m.group(3).replace(" (inlined)", "")
            c, s = float(m.group(1)), float(m.group(2))
            prev = out.get(sym, (0.0, 0.0))
            out[sym] = (max(prev[0], c), prev[1] + s)
    return out


def dso_self(data):
    """{dso: self %} of a recording."""
    out = {}
    for line in perf("-i", str(data), "--no-children", "--sort", "dso", "-g", "none").splitlines():
        m = SELF_LINE.match(line)
        if m and not line.lstrip().startswith("#"):
            out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(1))
    return out


# The decoder's yajl callbacks and what they call (src/capture/decoder.c), by self time: unwinding through
# libyajl, which Debian ships without symbols, does not name its frames, so yajl's share is its
# library's self time and the callbacks are counted by their own names.
CALLBACKS = ("keep", "on_key", "on_string", "on_scalar", "on_open", "on_close", "on_number", "on_null",
             "on_boolean", "on_start_map", "on_start_array", "check_escaped", "new_entry", "utf8_valid",
             "lookup_key", "surrogates_paired", "sax_fail")


def walpipe_breakdown(inc, dsos):
    g = lambda s: inc.get(s, (0.0, 0.0))[0]  # noqa: E731
    parse = g("wp_decoder_parse")
    yajl = sum(v for d, v in dsos.items() if d.startswith("libyajl"))
    callbacks = sum(v[1] for sym, v in inc.items() if sym.split(".")[0] in CALLBACKS)
    handle = g("yajl_alloc") + g("yajl_free")
    payload = g("wp_decoder_payload")
    shape = g("wp_decoder_shape")
    add_row = g("add_row") or g("wp_encoder_add")   # the row encoder moved to encoder.c
    recv = g("PQconsumeInput") + g("PQgetCopyData")
    rows = [
        ("yajl: tokenizing and unescaping (self time in libyajl)", yajl),
        ("decoder callbacks: key lookup, strict UTF-8 and escape checks, copy of kept values (self)", callbacks),
        ("decoder: the rest of wp_decoder_parse (libc memcpy/memcmp under the callbacks, validation, "
         "yajl handle per message: %.1f%%)" % handle,
         max(0.0, parse - yajl - callbacks)),
        ("payload encode (wp_decoder_payload)", payload),
        ("table shape lookup (wp_decoder_shape)", shape),
        ("binary COPY row framing (row encoder without payload/shape)", max(0.0, add_row - payload - shape)),
        ("libpq receive (PQconsumeInput, PQgetCopyData)", recv),
    ]
    rest = 100.0 - sum(v for _, v in rows)
    rows.append(("everything else (queue, feedback, keepalives, libc)", max(0.0, rest)))
    return rows


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sysdir, wpdir, outpath = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    L = ["# walpipe profile", ""]
    res = json.loads((sysdir / "results.json").read_text())
    for r in res["results"] + ([res["backlog"]] if res.get("backlog") else []):
        if r["contender"] != "walpipe":
            continue
        data = sysdir / "perf" / f"{r['workload']}_walpipe-system.data"
        if not data.exists():
            continue
        pids = r["pids"]
        rows = system_samples(data)
        idle = sum(x[0] for x in rows if x[2] == "swapper")
        roles = [("walpipe process (all threads)", set(r.get("tids") or [pids["process"]])),
                 ("walsender (source)", {pids["walsender"]}), ("staging backend", {pids["staging"]})]
        views = [(role, role_view(rows, tids)) for role, tids in roles]
        ours = sum(v[0] for _, v in views)
        L.append(f"## {r['workload']}: whole machine while walpipe drained {r['changes']:,} changes "
                 f"({r['seconds']:.1f}s)")
        L.append("")
        L.append("perf record -a -e cpu-clock (hardware counters are not available in this VM); "
                 "share of all CPU time on the machine (both cores):")
        L.append("")
        L.append("| process | % of machine CPU time | % of the pipeline's CPU |")
        L.append("|---|---:|---:|")
        for role, v in views:
            L.append(f"| {role} | {v[0]:.1f} | {100 * v[0] / ours if ours else 0:.1f} |")
        L.append(f"| idle | {idle:.1f} | |")
        L.append(f"| everything else on the machine (other sessions, samplers) | "
                 f"{max(0.0, 100 - ours - idle):.1f} | |")
        wp_tids = sorted(((sum(x[0] for x in rows if x[1] == t), t) for t in roles[0][1]), reverse=True)
        wp_total = sum(v for v, _ in wp_tids) or 1
        L.append("")
        L.append("walpipe's threads: " + ", ".join(f"{100 * v / wp_total:.1f}%" for v, _ in wp_tids if v > 0) +
                 " (the busiest is the reader: decode + encode; the stager only ships COPY data and "
                 "waits for commits)")
        L.append("")
        for role, v in views:
            L.append(f"{role}, by library: " + ", ".join(f"{d} {p:.0f}%" for p, d in v[1][:5]))
            L.append("")
            L.append("| % | library | symbol |")
            L.append("|---:|---|---|")
            for p, d, sym in v[2][:12]:
                L.append(f"| {p:.1f} | {d} | `{sym}` |")
            L.append("")
    for data in sorted((wpdir / "perf").glob("*-walpipe.data")):
        inc = inclusive(data)
        dsos = dso_self(data)
        L.append(f"## inside walpipe: {data.stem.replace('_walpipe-walpipe', '')} "
                 f"(perf record --call-graph dwarf -p walpipe; the reader thread, where its CPU goes)")
        L.append("")
        L.append("| where the walpipe process spends its CPU | % |")
        L.append("|---|---:|")
        for what, v in walpipe_breakdown(inc, dsos):
            L.append(f"| {what} | {v:.1f} |")
        m = inc.get("malloc", (0, 0))[1] + inc.get("_int_malloc", (0, 0))[1] + \
            inc.get("_int_free", (0, 0))[1] + inc.get("cfree@GLIBC_2.2.5", (0, 0))[1]
        L.append("")
        L.append(f"malloc/free self time, all callers: {m:.1f}%.")
        L.append("")
    outpath.write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
