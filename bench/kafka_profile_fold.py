#!/usr/bin/python3
"""kafka_profile_fold.py: where a producer's CPU goes, from a `bench/sink_kafka.py --perf DIR` profile.

  perf script -i DIR/plugin.data -F comm,ip,sym > plugin.txt   (likewise kcat.data)
  bench/kafka_profile_fold.py plugin.txt

Each sample (1 kHz cpu-clock, DWARF call graph) counts once, in the first category whose
function is on its stack, checked in the order below; librdkafka's own threads (rdk:*) by thread.
"""

import collections
import sys

CATS = [
    ("payload parse (yajl_tree_parse)", ["yajl_tree_parse"]),
    ("source block (gen_source, gen_envelope_tail)", ["gen_source", "gen_envelope_tail", "put_source"]),
    ("column lists (collist_load)", ["collist_load"]),
    ("Debezium envelope rest (wp_dbz_encode: yajl_gen of key and value)", ["wp_dbz_encode"]),
    ("rd_kafka_producev (enqueue)", ["rd_kafka_producev"]),
    ("delivery reports (rd_kafka_poll, kafka_serve)", ["rd_kafka_poll", "kafka_serve"]),
    ("plugin rest (kafka_deliver)", ["kafka_deliver"]),
]


def stacks(path):
    comm, frames = None, []
    for line in open(path):
        if not line.strip():
            if comm:
                yield comm, frames
            comm, frames = None, []
        elif not line[0].isspace():
            comm, frames = line.split()[0], []
        else:
            parts = line.split(None, 1)
            frames.append(parts[1].strip() if len(parts) > 1 else "?")
    if comm:
        yield comm, frames


def main():
    c = collections.Counter()
    n = 0
    for comm, fr in stacks(sys.argv[1]):
        n += 1
        if comm.startswith("rdk:"):
            c["librdkafka threads (" + ("rdk:broker*" if "broker" in comm else comm) + ")"] += 1
            continue
        for name, keys in CATS:
            if any(f.startswith(k) for f in fr for k in keys):
                c[name] += 1
                break
        else:
            c[f"main thread, other ({comm}: its own work, libc, kernel)"] += 1
    print(f"{n} samples at 1 kHz = {n / 1000:.2f} CPU s")
    for k, v in c.most_common():
        print(f"{v:6d} {100 * v / n:5.1f}%  {k}")


if __name__ == "__main__":
    main()
