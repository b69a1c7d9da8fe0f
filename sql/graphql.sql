-- Batch reads for the GraphQL loaders: one statement per kind of node, however many ids a
-- request collected. The column lists are the REST ones (users.sql, orders.sql) so the same
-- views render them. tenant_id leads every WHERE: another tenant's id finds nothing.

-- name: users_by_ids
SELECT id, tenant_id, email, username, status, roles, profile, version, created_at, updated_at
FROM users
WHERE tenant_id = $1 AND id = ANY($2::uuid[]);

-- name: products_by_ids
SELECT id, tenant_id, sku, name, price_cents, currency, stock, version, created_at, updated_at
FROM products
WHERE tenant_id = $1 AND id = ANY($2::uuid[]);

-- name: orders_by_ids
-- get_order for many ids: the order with its payment's state.
SELECT o.id, o.tenant_id, o.user_id, o.status, o.total_cents, o.currency, o.version,
       o.created_at, o.updated_at, p.step AS payment_step, p.outcome AS payment_outcome
FROM orders AS o
LEFT JOIN payments AS p ON p.tenant_id = o.tenant_id AND p.order_id = o.id
WHERE o.tenant_id = $1 AND o.id = ANY($2::uuid[]);
