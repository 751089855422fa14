#!/usr/bin/python3
"""sink_kafka.py: the Kafka sink plugin's throughput beside `kcat -P` (the librdkafka ceiling).

Against librdkafka's mock cluster (tools/kafka-mock, its own process, over TCP):
  1. kafka_driver feeds the plugin N events (the core's delivery loop without PostgreSQL;
     schemas_enable = false), timed from start until every event is reported durable;
  2. the records it wrote are read back with kcat and written to a file (key TAB value);
  3. `kcat -P` produces that file to a fresh topic of the same partition count with the same
     guarantees (idempotence, acks=all), timed until it exits (it flushes).
  4. the same with four headers like the plugin's on every record (walpipe.source/lsn/seq/rec).
Prints the rates, the ratio (goal >= 0.8) and CPU seconds per record of each producer (firmer
than elapsed time on a shared machine; the mock broker's CPU is not counted).  Not a test: nothing fails on speed.

Usage (built tree in build/, or WALPIPE_BIN set):  bench/sink_kafka.py [N] [--perf DIR]
--perf DIR records both producers with `perf record --call-graph dwarf` into DIR/plugin.data and
DIR/kcat.data (the rates are then not comparable with unprofiled runs); read them with
`perf report -i DIR/plugin.data --no-children --sort dso,sym` (or --sort comm for the threads), or
fold them into categories with bench/kafka_profile_fold.py (bench/latest/sink_kafka_profile.md).
"""

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
import kafkamock  # noqa: E402
from kafkamock import KafkaMock  # noqa: E402

PARTITIONS = 32  # the mock keeps 5 MB per partition: room for the whole run


def cpu_children():
    """CPU seconds (user + system) of the reaped children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main():
    argv = sys.argv[1:]
    perf_dir = None
    if "--perf" in argv:
        i = argv.index("--perf")
        perf_dir = Path(argv[i + 1]).resolve()
        perf_dir.mkdir(parents=True, exist_ok=True)
        del argv[i:i + 2]
    n = int(argv[0]) if argv else 50_000

    def perf(name):
        return (["perf", "record", "-q", "-e", "cpu-clock", "-F", "1000", "--call-graph", "dwarf,16384",
                 "-o", str(perf_dir / f"{name}.data"), "--"] if perf_dir else [])
    work = Path(tempfile.mkdtemp(prefix="wp-kafkabench-"))
    driver = kafkamock.build_dir() / "plugins" / "kafka" / "kafka_driver"
    plugin = kafkamock.plugin_dir() / "walpipe_sink_kafka.so"
    with KafkaMock(3, log_path=work / "mock.log") as mock:
        for t in ("drv.public.t", "drv.public.nokey", "kcat.t", "kcat.h"):
            mock.create(t, PARTITIONS)
        t0, c0 = time.monotonic(), cpu_children()
        subprocess.run(perf("plugin") + [str(driver), str(plugin), str(work / "state"), str(n), "-o", "brokers=" + mock.bootstrap,
                        "-o", "schemas_enable=false"], check=True, stdout=subprocess.DEVNULL,
                       stderr=open(work / "driver.log", "w"))
        t_plugin, c_plugin = time.monotonic() - t0, cpu_children() - c0
        records = 0
        size = 0
        with open(work / "records.tsv", "wb") as f:
            for t in ("drv.public.t", "drv.public.nokey"):
                out = subprocess.run(["kcat", "-b", mock.bootstrap, "-C", "-t", t, "-e", "-q", "-f", "%k\t%s\n"],
                                     check=True, capture_output=True).stdout
                records += out.count(b"\n")
                size += len(out)
                f.write(out)
        t0, c0 = time.monotonic(), cpu_children()
        subprocess.run(perf("kcat") + ["kcat", "-b", mock.bootstrap, "-P", "-t", "kcat.t", "-K", "\t", "-Z",
                        "-X", "enable.idempotence=true", "-X", "linger.ms=5", "-l", str(work / "records.tsv")],
                       check=True)
        t_kcat, c_kcat = time.monotonic() - t0, cpu_children() - c0
        # the same again with headers like the plugin's (walpipe.source/lsn/seq/rec, the exactly-once
        # identity every plugin record carries; kcat -P sends the same four on every record)
        hdrs = ["-H", "walpipe.source=drv", "-H", "walpipe.lsn=0/16C4F00", "-H", "walpipe.seq=3", "-H", "walpipe.rec=1"]
        t0, c0 = time.monotonic(), cpu_children()
        subprocess.run(["kcat", "-b", mock.bootstrap, "-P", "-t", "kcat.h", "-K", "\t", "-Z", *hdrs,
                        "-X", "enable.idempotence=true", "-X", "linger.ms=5", "-l", str(work / "records.tsv")],
                       check=True)
        t_kcath, c_kcath = time.monotonic() - t0, cpu_children() - c0
    print(f"events {n}, records {records}, {size / records:.0f} bytes/record, {PARTITIONS} partitions, mock cluster")
    print(f"kafka plugin (via kafka_driver): {t_plugin:.2f} s, {records / t_plugin:,.0f} records/s")
    print(f"kcat -P, same records:           {t_kcat:.2f} s, {records / t_kcat:,.0f} records/s")
    print(f"kcat -P, same records + headers: {t_kcath:.2f} s, {records / t_kcath:,.0f} records/s")
    print(f"ratio plugin/kcat: {t_kcat / t_plugin:.2f}  (goal >= 0.8); with headers {t_kcath / t_plugin:.2f}")
    # CPU seconds are firmer than elapsed time on a shared machine (the mock broker's are not counted)
    print(f"CPU per record: plugin {c_plugin / records * 1e6:.1f} us, kcat -P {c_kcat / records * 1e6:.1f} us "
          f"(with headers {c_kcath / records * 1e6:.1f} us), ratio {c_kcat / c_plugin:.2f} "
          f"(with headers {c_kcath / c_plugin:.2f})")


if __name__ == "__main__":
    main()
