#!/usr/bin/python3
"""sink_kafka_same_wire.py: does the Kafka plugin of this tree write what another build's writes?

For speed work on plugins/kafka: kafka_driver feeds each build's plugin the same N synthetic events
(a fresh mock cluster each, 32 partitions), the topics are read back with kcat (topic, partition,
offset, key, headers, value per record) and the two are compared line for line, sorted.  Only the
processing time is masked (ts_ms/ts_us/ts_ns: the plugin reads the real clock).  The mock keeps
5 MB per partition: keep N small enough (20 000 events without schemas, 5 000 with).

Usage: bench/sink_kafka_same_wire.py OTHER_BUILD_DIR [N] [--schemas]
       (this tree's build: build/, or the directory of $WALPIPE_BIN)
Exits 1 when the records differ, printing the first difference.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
import kafkamock  # noqa: E402
from kafkamock import KafkaMock  # noqa: E402


def records(build, n, schemas):
    work = Path(tempfile.mkdtemp(prefix="wp-kafkawire-"))
    with KafkaMock(3, log_path=work / "mock.log") as mock:
        for t in ("drv.public.t", "drv.public.nokey"):
            mock.create(t, 32)
        subprocess.run([str(build / "plugins" / "kafka" / "kafka_driver"), str(build / "plugins" / "walpipe_sink_kafka.so"),
                        str(work / "state"), str(n), "-o", "brokers=" + mock.bootstrap,
                        "-o", "schemas_enable=" + ("true" if schemas else "false")],
                       check=True, stdout=subprocess.DEVNULL, stderr=open(work / "driver.log", "w"))
        out = b""
        for t in ("drv.public.t", "drv.public.nokey"):
            out += subprocess.run(["kcat", "-b", mock.bootstrap, "-C", "-t", t, "-e", "-q",
                                   "-f", "%t %p %o %k | %h | %s\n"], check=True, capture_output=True).stdout
    return sorted(re.sub(rb'"ts_(ms|us|ns)":-?\d+', b'"ts_X":0', out).splitlines())


def main():
    argv = [a for a in sys.argv[1:] if a != "--schemas"]
    schemas = "--schemas" in sys.argv
    other = Path(argv[0]).resolve()
    n = int(argv[1]) if len(argv) > 1 else 20_000
    a = records(kafkamock.build_dir(), n, schemas)
    b = records(other, n, schemas)
    if a == b:
        print(f"same: {len(a)} records, {sum(map(len, a))} bytes (schemas_enable = {str(schemas).lower()})")
        return 0
    print(f"DIFFERENT: {len(a)} records here, {len(b)} in {other}")
    for x, y in zip(a, b):
        if x != y:
            print("here: ", x[:400])
            print("other:", y[:400])
            break
    return 1


if __name__ == "__main__":
    sys.exit(main())
