-- Workload behind pg15_w2j25_session.jsonl (PostgreSQL 15.18, wal2json 2.5-1+b1 from Debian 12).
-- Captured with pg_logical_slot_peek_changes(slot, NULL, NULL, 'format-version', '2',
-- 'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1'); B/C lines dropped.
SELECT 'init' FROM pg_create_logical_replication_slot('s', 'wal2json');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE mood AS ENUM ('sad','happy');
CREATE TYPE pair AS (a int, b text);
CREATE TABLE t_types(id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric, n_nan numeric, f4 real, f8 float8, f8_inf float8,
  b bool, "by" bytea, arr int[], tarr text[], j json, jb jsonb, ts timestamp, tstz timestamptz, d date, iv interval, u uuid, m money,
  dom posint, e mood, comp pair, c3 char(3), vc varchar(5), txt text, "Mixed Case Col" text, nul text, o oid, pt point, inet_c inet,
  "Col""Q" text, n2 numeric, f8neg float8, i8min bigint, big text);
ALTER TABLE t_types ALTER COLUMN big SET STORAGE EXTERNAL;
INSERT INTO t_types VALUES (2, -32768, 9223372036854775807, 12345678901234567890.123456789, 'NaN', 1.5, 0.1, '-Infinity', false, '\x00ff41',
 '{1,2,NULL}', '{"a b","c\"d",NULL}', '{"k": [1, 2], "s": "x"}', '{"k": [1, 2], "s": "x"}', '2024-02-29 13:14:15.123456',
 '2024-02-29 11:14:15.123456+00', '2024-02-29', '1 day 02:03:04', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 12.34, 5, 'happy', '(1,"x y")',
 'ab', 'héllo', E'line1\nline2\t"quoted" \\ back é \u0001', 'mixed', NULL, 4294967295, '(1.5,2)', '192.168.0.1/24', 'q',
 -0.000000000000000000000000000001e-100, '-0', -9223372036854775808, repeat('B', 3000));
UPDATE t_types SET i2 = 1 WHERE id = 2;
ALTER TABLE t_types REPLICA IDENTITY FULL;
UPDATE t_types SET i2 = 2 WHERE id = 2;
DELETE FROM t_types WHERE id = 2;
CREATE TABLE t_pk(id int primary key, v text);
INSERT INTO t_pk VALUES (1, 'a');
DELETE FROM t_pk;
TRUNCATE t_pk;
SELECT pg_logical_emit_message(false, 'hb', 'héllo "x"');
BEGIN; SELECT pg_logical_emit_message(true, 'px', E'tab\there'); INSERT INTO t_pk VALUES (5, NULL); COMMIT;
