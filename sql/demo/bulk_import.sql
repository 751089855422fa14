-- walpipe demo: one big transaction in the middle of the workload: 100 000
-- orders imported at once, announced by a transactional logical message.
BEGIN;
SELECT pg_logical_emit_message(true, 'walpipe-demo', 'bulk import of 100000 orders');
INSERT INTO orders (customer_id, status, amount, note, attrs, created_at)
SELECT 1 + g % 1000, 'imported', round((random() * 500)::numeric, 2), 'bulk import',
       jsonb_build_object('batch', 'import-1', 'row', g), now()
FROM generate_series(1, 100000) g;
COMMIT;
