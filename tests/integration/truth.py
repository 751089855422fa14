"""Ground truth for walpipe's staging, derived without walpipe.

A second wal2json slot, copied from walpipe's slot at the same position
(pg_copy_logical_replication_slot), is read through SQL
(pg_logical_slot_get_changes).  Its changes are turned into the events walpipe
should have staged: one per I/U/D/T and transactional M, keyed by (commit end
LSN of the transaction, ordinal within it), plus one per non-transactional M,
keyed by (its own LSN, 0).  compare() then checks staging holds each exactly
once with the same row image.
"""

import collections
import json
from decimal import Decimal

NUMERIC_TYPES = ("smallint", "integer", "bigint", "oid", "real", "double precision", "numeric")
OPS = {"I": "insert", "U": "update", "D": "delete", "T": "truncate", "M": "message"}


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def _loads(text):
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def _is_numeric(typ):
    return typ.split("(")[0] in NUMERIC_TYPES


def _norm(value, typ):
    """A value as wal2json printed it and as walpipe staged it, made comparable."""
    if value is None or isinstance(value, bool):
        return value
    if _is_numeric(typ):
        return Decimal(str(value))
    if typ == "bytea":
        s = str(value)
        return s[2:] if s.startswith("\\x") else s
    return str(value)


def _image(columns):
    return {c["name"]: _norm(c["value"], c["type"]) for c in columns}


def _staged_image(obj, types):
    return {k: _norm(v, types.get(k, "text")) for k, v in obj.items()}


def read_truth(cluster, dbname, slot):
    """Consumes slot; returns the expected events in stream order (dicts)."""
    rows = cluster.sql(
        "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'format-version', '2', "
        "'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1')", (slot,), dbname=dbname)
    events = []
    txn_end, seq = None, 0
    for (data,) in rows:
        c = _loads(data)
        a = c["action"]
        if a == "B":
            txn_end, seq = lsn_int(c["nextlsn"]), 0
            continue
        if a == "C":
            txn_end = None
            continue
        ev = {"type": OPS[a], "schema": c.get("schema"), "table": c.get("table")}
        if a == "M" and not c["transactional"]:
            ev.update(lsn=lsn_int(c["lsn"]), seq=0)
        else:
            seq += 1
            ev.update(lsn=txn_end, seq=seq)
        if a in "IU":
            ev["after"] = _image(c["columns"])
            ev["types"] = {col["name"]: col["type"] for col in c["columns"]}
        if a in "UD" and "identity" in c:
            ev["identity"] = _image(c["identity"])
            ev.setdefault("types", {}).update({col["name"]: col["type"] for col in c["identity"]})
        if a == "M":
            ev["message"] = {"prefix": c["prefix"], "content": c["content"],
                             "transactional": c["transactional"]}
        events.append(ev)
    return events


def read_staged(cluster, dbname, source=None):
    sql = ("SELECT lsn::text, seq, event_type, schema_name, table_name, payload::text, source "
           "FROM walpipe.raw_events")
    params = None
    if source is not None:
        sql += " WHERE source = %s"
        params = (source,)
    rows = cluster.sql(sql + " ORDER BY id", params, dbname=dbname)
    return [{"lsn": lsn_int(r[0]), "seq": r[1], "type": r[2], "schema": r[3], "table": r[4],
             "payload": _loads(r[5]), "source": r[6]} for r in rows]


Result = collections.namedtuple("Result", "expected staged missing doubled extra mismatched")


def compare(truth, staged, check_images=True):
    """Returns Result; missing/doubled/extra are lists of keys, mismatched of (key, why)."""
    want = {(e["lsn"], e["seq"]): e for e in truth}
    counts = collections.Counter((s["lsn"], s["seq"]) for s in staged)
    missing = [k for k in want if counts[k] == 0]
    doubled = [k for k, n in counts.items() if n > 1]
    extra = [k for k in counts if k not in want]
    mismatched = []
    if check_images:
        seen = set()
        for s in staged:
            k = (s["lsn"], s["seq"])
            e = want.get(k)
            if e is None or k in seen:
                continue
            seen.add(k)
            why = _mismatch(e, s)
            if why:
                mismatched.append((k, why))
    return Result(len(want), len(staged), missing, doubled, extra, mismatched)


def _mismatch(e, s):
    if e["type"] != s["type"]:
        return f"type {s['type']} != {e['type']}"
    if (e["schema"], e["table"]) != (s["schema"], s["table"]):
        return f"table {s['schema']}.{s['table']} != {e['schema']}.{e['table']}"
    p = s["payload"]
    types = e.get("types", {})
    if "after" in e and _staged_image(p.get("after", {}), types) != e["after"]:
        return f"after {p.get('after')} != {e['after']}"
    if "identity" in e:
        old = p.get("key", p.get("before"))
        if old is None or _staged_image(old, types) != e["identity"]:
            return f"old row {old} != {e['identity']}"
    if "message" in e:
        m = e["message"]
        if (p.get("prefix"), p.get("content"), p.get("transactional")) != (
                m["prefix"], m["content"], m["transactional"]):
            return f"message {p} != {m}"
    return None


def assert_exactly_once(truth, staged, check_images=True):
    r = compare(truth, staged, check_images)
    problems = []
    if r.missing:
        problems.append(f"{len(r.missing)} missing, e.g. {r.missing[:5]}")
    if r.doubled:
        problems.append(f"{len(r.doubled)} doubled, e.g. {r.doubled[:5]}")
    if r.extra:
        problems.append(f"{len(r.extra)} not in the source, e.g. {r.extra[:5]}")
    if r.mismatched:
        problems.append(f"{len(r.mismatched)} with a wrong image, e.g. {r.mismatched[:3]}")
    assert not problems, (f"staging vs ground truth ({r.expected} source changes, {r.staged} staged): "
                          + "; ".join(problems))
    return r


def reconstruct(staged, key="id"):
    """Replays staged events in commit order (snapshot rows at their snapshot's LSN) into
    {(schema, table): {key: row}}: what a mirror of the source must hold."""
    state = collections.defaultdict(dict)
    order = sorted(staged, key=lambda s: (s["lsn"], 0 if s["type"] == "snapshot" else 1, s["seq"]))
    for s in order:
        t = (s["schema"], s["table"])
        p = s["payload"]
        if s["type"] in ("insert", "snapshot"):
            state[t][p["after"][key]] = dict(p["after"])
        elif s["type"] == "update":
            old = p.get("key", p.get("before", {})).get(key, p["after"][key])
            row = dict(state[t].pop(old, {}))
            row.update(p["after"])   # columns absent from "after" (unchanged TOAST) keep their value
            state[t][p["after"][key]] = row
        elif s["type"] == "delete":
            state[t].pop(p.get("key", p.get("before", {}))[key], None)
        elif s["type"] == "truncate":
            state[t].clear()
    return state
