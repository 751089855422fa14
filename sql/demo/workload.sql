-- walpipe demo: the pgbench script of the sample workload (scripts/demo runs
-- it with pgbench -n -f).  Each pgbench transaction is one of:
--   40%  a new order, and its customer created or updated (2 changes, 1 transaction)
--   30%  an order changes status and amount
--   10%  an order is deleted
--   20%  a customer is created or updated (upsert)
-- Seed order ids are 1..20000; updates and deletes pick one of them (a
-- deleted one matches no row, which is a transaction without changes).
\set r random(1, 100)
\set order_id random(1, 20000)
\set customer_id random(1, 1500)
\if :r <= 40
BEGIN;
INSERT INTO orders (customer_id, status, amount, note, attrs)
VALUES (:customer_id, 'new', round((random() * 500)::numeric, 2), 'pgbench order',
        jsonb_build_object('channel', 'web', 'items', 1 + :r % 5));
INSERT INTO customers (id, name, email)
VALUES (:customer_id, 'Customer ' || :customer_id, 'c' || :customer_id || '@example.com')
ON CONFLICT (id) DO UPDATE SET email = excluded.email;
COMMIT;
\elif :r <= 70
UPDATE orders
SET status = (ARRAY['paid', 'shipped', 'returned'])[1 + :r % 3], amount = amount + 1.50
WHERE id = :order_id;
\elif :r <= 80
DELETE FROM orders WHERE id = :order_id;
\else
INSERT INTO customers (id, name, email)
VALUES (:customer_id, 'Customer ' || :customer_id, 'customer' || :customer_id || '@example.org')
ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email;
\endif
