#!/usr/bin/python3
"""python_consumer.py: the Python CDC stack that walpipe replaces, as a benchmark contender.

This is the pipeline the PostgreSQL-CDC articles recommend, written with care so the
comparison is fair:

    psycopg2 LogicalReplicationConnection (wal2json, format-version 2)
      -> json.loads each message, build the same compact row image walpipe stores
      -> COPY (text format) into walpipe.raw_events in batches
      -> same transaction: the source's checkpoint row in walpipe.checkpoints
      -> COMMIT -> send_feedback(flush_lsn = last committed transaction end)

It fills the same raw_events columns as walpipe (source, event_type, payload, lsn,
xid, commit_ts, seq, schema_name, table_name, shape_id, batch_id via SET LOCAL),
records new table shapes in walpipe.table_schemas, and uses walpipe's batch
limits (10 000 rows / 8 MB / 50 ms, or when the stream runs dry).  Payload value
rules follow README "Staging schema" (ints as numbers, bigint beyond 2^53 and
numeric as strings, bytea as "\\x..", everything else as text).  A restart
resumes from the staging checkpoint and skips what is already staged.

What it does not do (walpipe does): validate messages and route bad ones to
dead letters, reconnect with backoff, send status updates while staging is
slow (psycopg2 only answers keepalives between messages).

Usage: python_consumer.py --source DSN --staging DSN --slot SLOT --name SOURCE
Stops on SIGTERM/SIGINT after committing and acknowledging what it holds.
"""

import argparse
import io
import json
import select
import signal
import sys
import time
import uuid

import psycopg2
import psycopg2.extras

BATCH_ROWS = 10000
BATCH_BYTES = 8 * 1024 * 1024
BATCH_MS = 50
STATUS_INTERVAL_S = 1.0
INT53 = 1 << 53
FNV_OFFSET = 14695981039346656037
FNV_PRIME = 1099511628211
MASK64 = (1 << 64) - 1

WAL2JSON_OPTIONS = {"format-version": "2", "include-xids": "1", "include-timestamp": "1",
                    "include-lsn": "1", "include-type-oids": "1", "include-column-positions": "1"}
# The same session settings walpipe pins, so values render the same way.
SOURCE_OPTIONS = ("-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres "
                  "-c bytea_output=hex -c extra_float_digits=3")
OPS = {"I": "insert", "U": "update", "D": "delete", "T": "truncate", "M": "message"}
COPY_SQL = ("COPY walpipe.raw_events (source, event_type, payload, lsn, xid, commit_ts, seq, "
            "schema_name, table_name, shape_id) FROM STDIN")
CHECKPOINT_SQL = (
    "INSERT INTO walpipe.checkpoints AS c (source, slot, systemid, lsn, txn_end, txn_seq, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, now()) ON CONFLICT (source) DO UPDATE SET slot = excluded.slot, "
    "systemid = excluded.systemid, lsn = excluded.lsn, txn_end = excluded.txn_end, "
    "txn_seq = excluded.txn_seq, updated_at = excluded.updated_at")

# Built once: json.loads/json.dumps with keyword arguments build a new coder on every call.
_decode = json.JSONDecoder(parse_float=str).decode
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_COPY_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

stop = False


def _on_signal(signum, frame):
    global stop
    stop = True


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(v):
    return f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"


def copy_text(s):
    """A value in COPY text format (NULL as \\N)."""
    return "\\N" if s is None else str(s).translate(_COPY_ESCAPE)


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


# Value converters by type (wal2json prints numbers bare; json.loads keeps floats as text).
def _int8(v):
    return v if -INT53 <= v <= INT53 else str(v)


def _numeric(v):
    return str(v)


def _float(v):
    return float(v)


def _bytea(v):
    return "\\x" + v


_BY_OID = {16: None, 21: None, 23: None, 26: None, 20: _int8, 700: _float, 701: _float,
           1700: _numeric, 17: _bytea}


def _converter(typeoid, typename):
    if typeoid in _BY_OID:
        return _BY_OID[typeoid]
    if typeoid is not None:
        return None
    if typename == "numeric" or typename.startswith("numeric("):
        return _numeric
    if typename == "bigint":
        return _int8
    if typename in ("real", "double precision"):
        return _float
    if typename == "bytea":
        return _bytea
    return None


class Consumer:
    def __init__(self, args):
        self.args = args
        self.name = args.name
        self.name_copy = copy_text(args.name)
        self.conv = {}          # (typeoid, type) -> converter or None
        self.shapes = {}        # (schema, table, ((name, type, oid), ...)) -> shape id
        self.new_shapes = []    # shapes not yet in table_schemas
        self.known_shapes = set()
        self.table_ncols = {}   # (schema, table) -> whole-row column count
        self.names = {}         # schema/table text -> COPY-escaped text
        # stream state
        self.in_txn = False
        self.txn_end_text = None
        self.txn_end = 0
        self.xid = "\\N"
        self.ts = "\\N"
        self.seq = 0
        self.skip_txn = False
        self.skip_seq = 0
        # batch
        self.lines = []
        self.rows = 0
        self.bytes = 0
        self.batch_started = None
        self.pos = None          # (lsn, txn_end, txn_seq) to write with the batch
        self.ack_pending = 0     # commit end LSN to acknowledge after the batch commits
        self.acked = 0
        self.last_status = 0.0
        self.total = 0

    # -- connections

    def connect(self):
        a = self.args
        self.src = psycopg2.connect(a.source, options=SOURCE_OPTIONS,
                                    application_name=f"pyconsumer_{self.name}",
                                    connection_factory=psycopg2.extras.LogicalReplicationConnection)
        self.rcur = self.src.cursor()
        self.rcur.execute("IDENTIFY_SYSTEM")
        self.systemid = str(self.rcur.fetchone()[0])
        self.stg = psycopg2.connect(a.staging, application_name=f"pyconsumer_stager_{self.name}",
                                    options="-c synchronous_commit=on")
        self.scur = self.stg.cursor()
        self.scur.execute("SELECT walpipe.ensure_partitions(7)")
        self.scur.execute("SELECT lsn::text, txn_end::text, coalesce(txn_seq, 0) "
                          "FROM walpipe.checkpoints WHERE source = %s", (self.name,))
        row = self.scur.fetchone()
        self.stg.commit()
        if row:
            self.start = (lsn_int(row[0]), lsn_int(row[1]) if row[1] else 0, row[2])
        else:
            self.start = (0, 0, 0)
        self.rcur.start_replication(slot_name=a.slot, decode=False, start_lsn=self.start[0],
                                    options=WAL2JSON_OPTIONS, status_interval=10)

    # -- messages

    def name_text(self, s):
        t = self.names.get(s)
        if t is None:
            t = self.names[s] = copy_text(s)
        return t

    def image(self, cols):
        """(row image dict, shape signature) of a wal2json column list."""
        out = {}
        sig = []
        conv = self.conv
        for c in cols:
            name = c["name"]
            typ = c["type"]
            oid = c.get("typeoid")
            key = (oid, typ)
            f = conv.get(key, 0)
            if f == 0:
                f = conv[key] = _converter(oid, typ)
            v = c["value"]
            if f is not None and v is not None:
                v = f(v)
            out[name] = v
            sig.append(key + (name, c.get("position")))
        return out, tuple(sig)

    def shape_id(self, schema, table, sig):
        key = (schema, table, sig)
        sid = self.shapes.get(key)
        if sid is None:
            # walpipe's shape text: "position" (the attnum) only where wal2json sent one
            cols = json.dumps([dict({"name": n, "type": t, "typeoid": o}, **({"position": p} if p else {}))
                               for (o, t, n, p) in sig], separators=(",", ":"), ensure_ascii=False)
            h = fnv1a(FNV_OFFSET, (schema or "").encode() + b"\0" + table.encode() + b"\0")
            h = fnv1a(h, cols.encode())
            sid = (h & 0x7FFFFFFFFFFFFFFF) or 1
            self.shapes[key] = sid
            if sid not in self.known_shapes:
                self.known_shapes.add(sid)
                self.new_shapes.append((sid, schema or "", table, cols, self.txn_end_text))
        return sid

    def payload(self, d, a, schema, table):
        """(payload dict, shape id) of an I/U/D/T change."""
        tkey = (schema, table)
        if a == "I":
            after, sig = self.image(d["columns"])
            self.table_ncols[tkey] = len(after)
            return {"after": after}, self.shape_id(schema, table, sig)
        if a == "U":
            after, sig = self.image(d["columns"])
            p = {"after": after}
            ident = d.get("identity")
            if ident is not None:
                old, _ = self.image(ident)
                full = len(old) >= len(after) and all(k in old for k in after)
                if full:
                    self.table_ncols[tkey] = len(old)
                p["before" if full else "key"] = old
            return p, self.shape_id(schema, table, sig)
        if a == "D":
            old, sig = self.image(d.get("identity") or [])
            full = self.table_ncols.get(tkey) == len(old)
            return {"before" if full else "key": old}, self.shape_id(schema, table, sig)
        return {}, None

    def handle(self, data):
        d = _decode(data.decode("utf-8"))
        a = d["action"]
        if a == "B":
            self.in_txn = True
            self.txn_end_text = d["nextlsn"]
            self.txn_end = lsn_int(self.txn_end_text)
            x = d.get("xid")
            self.xid = "\\N" if x is None else str(x)
            self.ts = copy_text(d.get("timestamp"))
            self.seq = 0
            self.skip_txn = self.txn_end <= self.start[0]
            self.skip_seq = self.start[2] if self.txn_end == self.start[1] else 0
            return
        if a == "C":
            self.in_txn = False
            if not self.skip_txn:
                self.pos = (self.txn_end, 0, 0)
                self.ack_pending = self.txn_end
            self.skip_txn = False
            return
        if a == "M" and not d["transactional"]:
            lsn = lsn_int(d["lsn"])
            if lsn <= self.start[0]:
                return
            p = {"prefix": d["prefix"], "content": d["content"], "transactional": False}
            self.add_line("message", p, d["lsn"], "\\N", "\\N", 0, None, None, None)
            if not self.in_txn:
                self.pos = (lsn, 0, 0)
                self.ack_pending = lsn
            return
        self.seq += 1
        if self.skip_txn or self.seq <= self.skip_seq:
            return
        if a == "M":
            p, sid, schema, table = ({"prefix": d["prefix"], "content": d["content"],
                                      "transactional": True}, None, None, None)
        else:
            schema, table = d.get("schema"), d["table"]
            p, sid = self.payload(d, a, schema, table)
        self.add_line(OPS[a], p, self.txn_end_text, self.xid, self.ts, self.seq, schema, table, sid)
        self.pos = (self.txn_end, self.txn_end, self.seq)

    def add_line(self, etype, p, lsn, xid, ts, seq, schema, table, sid):
        payload = _encode(p)
        # json.dumps escapes control characters; only the backslash needs COPY escaping
        payload = payload.replace("\\", "\\\\")
        line = (f"{self.name_copy}\t{etype}\t{payload}\t{lsn}\t{xid}\t{ts}\t{seq}\t"
                f"{self.name_text(schema) if schema is not None else chr(92) + 'N'}\t"
                f"{self.name_text(table) if table is not None else chr(92) + 'N'}\t"
                f"{sid if sid is not None else chr(92) + 'N'}\n")
        if not self.lines:
            self.batch_started = time.monotonic()
        self.lines.append(line)
        self.rows += 1
        self.bytes += len(line)

    # -- batches

    def flush(self):
        """Stage the batch (rows, shapes, checkpoint) in one transaction, commit, acknowledge."""
        if not self.lines and self.pos is None:
            return
        cur = self.scur
        cur.execute("SET LOCAL walpipe.batch_id = %s", (str(uuid.uuid4()),))
        for sid, schema, table, cols, first in self.new_shapes:
            cur.execute("INSERT INTO walpipe.table_schemas (source, shape_id, schema_name, table_name, "
                        "columns, first_lsn) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (self.name, sid, schema, table, cols, first))
        self.new_shapes = []
        if self.lines:
            cur.copy_expert(COPY_SQL, io.StringIO("".join(self.lines)), size=1 << 18)
        if self.pos is not None:
            lsn, txn_end, txn_seq = self.pos
            cur.execute(CHECKPOINT_SQL, (self.name, self.args.slot, self.systemid, lsn_text(lsn),
                                         lsn_text(txn_end) if txn_end else None,
                                         txn_seq if txn_end else None))
        self.stg.commit()
        self.total += self.rows
        self.lines = []
        self.rows = self.bytes = 0
        self.pos = None
        if self.ack_pending > self.acked:
            self.acked = self.ack_pending
            self.rcur.send_feedback(flush_lsn=self.acked, reply=False, force=True)
            self.last_status = time.monotonic()

    def idle_ack(self):
        """Nothing in flight: record the keepalive's walEnd so that a quiet slot advances."""
        wal_end = self.rcur.wal_end
        if self.in_txn or not wal_end or wal_end <= self.acked:
            return
        if time.monotonic() - self.last_status < STATUS_INTERVAL_S:
            return
        self.pos = (wal_end, 0, 0)
        self.ack_pending = wal_end
        self.flush()

    def run(self):
        self.connect()
        rcur = self.rcur
        while not stop:
            msg = rcur.read_message()
            if msg is not None:
                self.handle(msg.payload)
                if (self.rows >= BATCH_ROWS or self.bytes >= BATCH_BYTES or
                        (self.lines and (time.monotonic() - self.batch_started) * 1000 >= BATCH_MS)):
                    self.flush()
                continue
            # the stream ran dry: stage what we hold now, keeps latency low
            if self.lines or self.pos is not None:
                self.flush()
            else:
                self.idle_ack()
            try:
                select.select([rcur], [], [], 0.1)
            except InterruptedError:
                pass
        self.flush()
        print(f"pyconsumer: stopped; staged {self.total} events, acknowledged {lsn_text(self.acked)}",
              file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="libpq conninfo of the source database")
    ap.add_argument("--staging", required=True, help="libpq conninfo of the staging database")
    ap.add_argument("--slot", required=True, help="existing wal2json logical slot")
    ap.add_argument("--name", required=True, help="source name (raw_events.source)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    Consumer(args).run()


if __name__ == "__main__":
    main()
