"""kafkamock: the mock Kafka cluster (tools/kafka-mock) for tests and the demo.

KafkaMock starts the kafka-mock process, reads its bootstrap address (stdout line
1) and sends it fault commands (down/up a broker, push request errors, create a
topic), each answered "ok" before the call returns.  Topics are read back with
clients walpipe did not write: kcat (read_kcat) and python3-confluent-kafka
(read_confluent).  A record is a dict: topic, partition, offset, key, value
(str or None for a tombstone) and headers (dict name -> str).
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient


def build_dir():
    """The build tree: next to $WALPIPE_BIN, else <repo>/build."""
    b = os.environ.get("WALPIPE_BIN")
    if b:
        return Path(b).resolve().parent
    return Path(__file__).resolve().parents[2] / "build"


def mock_bin():
    return build_dir() / "tools" / "kafka-mock" / "kafka-mock"


def plugin_dir():
    d = os.environ.get("WALPIPE_PLUGIN_DIR")
    return Path(d) if d else build_dir() / "plugins"


class KafkaMock:
    """One mock cluster process.  Use as a context manager, or call stop()."""

    def __init__(self, brokers=3, log_path=None):
        self.brokers = brokers
        # its log goes to a file: a pipe nobody reads would fill and stall the cluster
        self.log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(mock_bin()), str(brokers)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.log.seek(0)
            raise RuntimeError("kafka-mock printed no bootstrap address: " + self.log.read())
        self.bootstrap = line

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError("kafka-mock %r: %s" % (line, answer))

    def down(self, broker):
        self.command("down %d" % broker)

    def up(self, broker):
        self.command("up %d" % broker)

    def errors(self, apikey, count, errcode):
        self.command("errors %d %d %d" % (apikey, count, errcode))

    def create(self, topic, partitions):
        self.command("create %s %d" % (topic, partitions))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---- reading back, with clients walpipe did not write

    def topics(self):
        md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=30)
        return sorted(t for t in md.topics if not t.startswith("__"))

    def read_kcat(self, topic):
        """Every record of a topic, read by kcat (JSON lines; payload/key are JSON strings)."""
        out = subprocess.run(["kcat", "-b", self.bootstrap, "-C", "-t", topic, "-J", "-e", "-q"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        recs = []
        for line in out.splitlines():
            m = json.loads(line)
            h = m.get("headers") or []
            recs.append({"topic": m["topic"], "partition": m["partition"], "offset": m["offset"],
                         "key": m.get("key"), "value": m.get("payload"),
                         "headers": dict(zip(h[0::2], h[1::2]))})
        recs.sort(key=lambda r: (r["partition"], r["offset"]))
        return recs

    def read_confluent(self, topic):
        """Every record of a topic, read by confluent_kafka from each partition's start to its end."""
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "wptest-reader",
                      "enable.auto.commit": False, "enable.partition.eof": True})
        try:
            parts = c.list_topics(topic, timeout=30).topics[topic].partitions
            ends = {}
            assign = []
            for p in parts:
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                if lo != 0:
                    raise RuntimeError("%s [%d] starts at offset %d: the mock dropped old records (it keeps "
                                       "5 MB per partition); create the topic with more partitions" % (topic, p, lo))
                if hi > lo:
                    ends[p] = hi
                    assign.append(TopicPartition(topic, p, lo))
            recs = []
            c.assign(assign)
            while ends:
                m = c.poll(5.0)
                if m is None:
                    continue
                if m.error():
                    if m.error().code() == -191:  # _PARTITION_EOF
                        if m.offset() >= ends.get(m.partition(), 0):
                            ends.pop(m.partition(), None)
                        continue
                    raise RuntimeError(str(m.error()))
                key, val = m.key(), m.value()
                recs.append({"topic": topic, "partition": m.partition(), "offset": m.offset(),
                             "key": key.decode() if key is not None else None,
                             "value": val.decode() if val is not None else None,
                             "headers": {k: v.decode() for k, v in (m.headers() or [])}})
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    ends.pop(m.partition(), None)
            recs.sort(key=lambda r: (r["partition"], r["offset"]))
            return recs
        finally:
            c.close()


def identity(rec):
    """(source, lsn text, seq, record index) from walpipe's headers."""
    h = rec["headers"]
    return (h["walpipe.source"], h["walpipe.lsn"], int(h["walpipe.seq"]), int(h["walpipe.rec"]))


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
