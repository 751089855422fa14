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


def _truth_events(datas):
    """Yields the expected events (dicts, stream order) of wal2json v2 messages, B/C folded in."""
    txn_end, seq = None, 0
    for data in datas:
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
        types = {}
        if a in "IU":
            ev["after"] = _image(c["columns"])
            types.update({col["name"]: col["type"] for col in c["columns"]})
        if a in "UD" and "identity" in c:
            ev["identity"] = _image(c["identity"])
            types.update({col["name"]: col["type"] for col in c["identity"]})
        ev["types"] = types
        if a == "M":
            ev["message"] = {"prefix": c["prefix"], "content": c["content"],
                             "transactional": c["transactional"]}
        yield ev


def read_truth(cluster, dbname, slot):
    """Consumes slot; returns the expected events in stream order (dicts)."""
    rows = cluster.sql(
        "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'format-version', '2', "
        "'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1')", (slot,), dbname=dbname)
    return list(_truth_events(data for (data,) in rows))


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
    """Replays staged events in version order (lsn, seq) into {(schema, table): {key: row}}: what
    a mirror of the source must hold.  Snapshot rows are at (their snapshot's LSN, 0), a resync's
    truncate before them at (that LSN, -1)."""
    state = collections.defaultdict(dict)
    order = sorted(staged, key=lambda s: (s["lsn"], s["seq"], 0 if s["type"] == "snapshot" else 1))
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


# --------------------------------------------------------------------------
# Streaming comparison, for runs too large to hold as dicts (torture suite).
#
# Both sides are read through server-side cursors.  Truth is only peeked (the
# slot is left as it was), so that a second pass can fetch the full expected
# event of the few keys that differ.  Memory: one (key -> 64-bit digest) entry
# per source change.

Tally = collections.namedtuple("Tally", "expected staged missing doubled extra mismatched examples")

_TRUTH_SQL = ("SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'format-version', '2', "
              "'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1')")


def _iter_truth(cluster, dbname, slot, itersize=20000):
    """Yields the expected events of slot in stream order, like read_truth,
    without consuming the slot or holding them all."""
    conn = cluster.connect(dbname, autocommit=False)
    try:
        cur = conn.cursor(name="truth_stream")
        cur.itersize = itersize
        cur.execute(_TRUTH_SQL, (slot,))
        yield from _truth_events(data for (data,) in cur)
        cur.close()
        conn.commit()
    finally:
        conn.close()


def _items(image):
    return None if image is None else tuple(sorted(image.items(), key=lambda kv: kv[0]))


def _truth_digest(e):
    m = e.get("message")
    return hash((e["type"], e["schema"], e["table"], _items(e.get("after")), _items(e.get("identity")),
                 None if m is None else (m["prefix"], m["content"], m["transactional"])))


def _staged_digest(typ, schema, table, p, types):
    after = old = msg = None
    if typ in ("insert", "update"):
        after = _staged_image(p.get("after", {}), types)
    if typ in ("update", "delete"):
        o = p.get("key", p.get("before"))
        old = None if o is None else _staged_image(o, types)
    if typ == "message":
        msg = (p.get("prefix"), p.get("content"), p.get("transactional"))
    return hash((typ, schema, table, _items(after), _items(old), msg))


def stream_compare(source, dbname, slot, staging, staging_db, source_name=None, max_examples=5):
    """Compares staging with the truth slot, row image included, exactly
    like compare(), but streaming.  Returns Tally: counts of expected
    changes, staged rows, missing, doubled (keys staged more than once),
    extra (staged keys not in the source) and mismatched (wrong image), and
    examples: {kind: [...]} with up to max_examples of each."""
    want = {}                              # (lsn, seq) -> digest
    types = collections.defaultdict(dict)  # (schema, table) -> {column: type}
    for e in _iter_truth(source, dbname, slot):
        want[(e["lsn"], e["seq"])] = _truth_digest(e)
        if e["types"]:
            types[(e["schema"], e["table"])].update(e["types"])

    seen = collections.Counter()
    staged = 0
    mism = []
    mism_n = 0
    conn = staging.connect(staging_db, autocommit=False)
    try:
        cur = conn.cursor(name="staged_stream")
        cur.itersize = 20000
        sql = ("SELECT lsn::text, seq, event_type, schema_name, table_name, payload::text "
               "FROM walpipe.raw_events")
        if source_name is not None:
            cur.execute(sql + " WHERE source = %s", (source_name,))
        else:
            cur.execute(sql)
        for lsn, seq, typ, schema, table, payload in cur:
            staged += 1
            k = (lsn_int(lsn), seq)
            seen[k] += 1
            if seen[k] > 1 or k not in want:
                continue
            d = _staged_digest(typ, schema, table, _loads(payload), types.get((schema, table), {}))
            if d != want[k]:
                mism_n += 1
                if len(mism) < max_examples:
                    mism.append({"key": k, "staged": {"type": typ, "table": f"{schema}.{table}",
                                                      "payload": payload}})
        cur.close()
        conn.commit()
    finally:
        conn.close()

    missing = [k for k in want if k not in seen]
    doubled = [k for k, n in seen.items() if n > 1]
    extra = [k for k in seen if k not in want]
    if mism:  # second pass: what the source said for those keys
        keys = {m["key"]: m for m in mism}
        for e in _iter_truth(source, dbname, slot):
            k = (e["lsn"], e["seq"])
            if k in keys:
                keys[k]["expected"] = {x: e[x] for x in ("type", "schema", "table", "after", "identity",
                                                         "message") if x in e}
    fmt = lambda ks: [(f"{k[0] >> 32:X}/{k[0] & 0xFFFFFFFF:X}", k[1]) for k in ks[:max_examples]]
    examples = {"missing": fmt(missing), "doubled": fmt(doubled), "extra": fmt(extra), "mismatched": mism}
    return Tally(len(want), staged, len(missing), len(doubled), len(extra), mism_n, examples)
