-- Products, orders and their items. tenant_id leads every WHERE.

-- name: insert_product
INSERT INTO products (tenant_id, id, sku, name, price_cents, currency, stock)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING id, tenant_id, sku, name, price_cents, currency, stock, version, created_at, updated_at;

-- name: get_product
SELECT id, tenant_id, sku, name, price_cents, currency, stock, version, created_at, updated_at
FROM products
WHERE tenant_id = $1 AND id = $2;

-- name: list_products
-- Keyset pagination on id (UUIDv7: creation order), like every list.
SELECT id, tenant_id, sku, name, price_cents, currency, stock, version, created_at, updated_at
FROM products
WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2)
ORDER BY id
LIMIT $3;

-- name: lock_products
-- Locks the order's products in id order before the stock UPDATE: two orders naming the same
-- products in opposite orders then queue instead of deadlocking.
SELECT id, price_cents, currency, stock
FROM products
WHERE tenant_id = $1 AND id = ANY($2::uuid[])
ORDER BY id
FOR UPDATE;

-- name: reserve_stock
-- The conditional UPDATE that keeps stock >= 0: a row whose stock is short is not updated,
-- and the caller, seeing fewer rows than products, rolls the whole order back. $2 ids and $3
-- quantities are parallel arrays with one entry per product.
UPDATE products AS p
SET stock = p.stock - r.quantity, version = p.version + 1, updated_at = now()
FROM unnest($2::uuid[], $3::int[]) AS r (id, quantity)
WHERE p.tenant_id = $1 AND p.id = r.id AND p.stock >= r.quantity
RETURNING p.id;

-- name: release_stock
-- Gives an order's reserved stock back (cancel, failed payment), in one statement.
UPDATE products AS p
SET stock = p.stock + s.quantity, version = p.version + 1, updated_at = now()
FROM (
    SELECT product_id, sum(quantity)::int AS quantity
    FROM order_items
    WHERE tenant_id = $1 AND order_id = $2
    GROUP BY product_id
) AS s
WHERE p.tenant_id = $1 AND p.id = s.product_id;

-- name: insert_order
INSERT INTO orders (tenant_id, id, user_id, total_cents, currency)
VALUES ($1, $2, $3, $4, $5)
RETURNING id, tenant_id, user_id, status, total_cents, currency, version, created_at, updated_at;

-- name: insert_items
-- All of an order's lines in one statement: parallel arrays of product ids, quantities, prices.
INSERT INTO order_items (tenant_id, order_id, line, product_id, quantity, unit_price_cents)
SELECT $1, $2, (ord - 1)::smallint, product_id, quantity, price
FROM unnest($3::uuid[], $4::int[], $5::bigint[]) WITH ORDINALITY AS t (product_id, quantity, price, ord);

-- name: get_order
-- The order with its payment's state (null before the first pay).
SELECT o.id, o.tenant_id, o.user_id, o.status, o.total_cents, o.currency, o.version,
       o.created_at, o.updated_at, p.step AS payment_step, p.outcome AS payment_outcome
FROM orders AS o
LEFT JOIN payments AS p ON p.tenant_id = o.tenant_id AND p.order_id = o.id
WHERE o.tenant_id = $1 AND o.id = $2;

-- name: list_orders
-- Keyset on id; $3 an optional status filter (served by orders_tenant_status).
SELECT o.id, o.tenant_id, o.user_id, o.status, o.total_cents, o.currency, o.version,
       o.created_at, o.updated_at, p.step AS payment_step, p.outcome AS payment_outcome
FROM orders AS o
LEFT JOIN payments AS p ON p.tenant_id = o.tenant_id AND p.order_id = o.id
WHERE o.tenant_id = $1 AND ($2::uuid IS NULL OR o.id > $2)
  AND ($3::text IS NULL OR o.status = $3)
ORDER BY o.id
LIMIT $4;

-- name: items_of_orders
-- The lines of a page of orders in one round trip.
SELECT order_id, line, product_id, quantity, unit_price_cents
FROM order_items
WHERE tenant_id = $1 AND order_id = ANY($2::uuid[])
ORDER BY order_id, line;

-- name: move_order
-- The only way an order changes state: from one of the states in $3 to $4. Conditional, so
-- a late or repeated signal (a webhook, a resumed saga) can never move an order backwards.
UPDATE orders
SET status = $4, version = version + 1, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = ANY($3::text[])
RETURNING id, tenant_id, user_id, status, total_cents, currency, version, created_at, updated_at;
