-- Catalog, orders, payments: products with stock, orders with items, the pay saga's persisted
-- state, idempotency keys and the provider's webhook events.

CREATE TABLE products (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL DEFAULT surge_uuid_v7(),
    sku         text NOT NULL CHECK (length(sku) BETWEEN 1 AND 64),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price_cents bigint NOT NULL CHECK (price_cents >= 0),
    currency    text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- What is still available after reservations. The CHECK is the last line of defence: the
    -- reserve statement's own `stock >= $n` condition is what keeps concurrent orders honest.
    stock       integer NOT NULL CHECK (stock >= 0),
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX products_tenant_sku_key ON products (tenant_id, sku);

CREATE TABLE orders (
    tenant_id   uuid NOT NULL,
    id          uuid NOT NULL DEFAULT surge_uuid_v7(),
    user_id     uuid NOT NULL,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'paying', 'paid', 'payment_failed', 'cancelled')),
    total_cents bigint NOT NULL CHECK (total_cents >= 0),
    currency    text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, user_id) REFERENCES users (tenant_id, id) ON DELETE CASCADE
);
-- ?status= filter with keyset pagination on id.
CREATE INDEX orders_tenant_status ON orders (tenant_id, status, id);

CREATE TABLE order_items (
    tenant_id        uuid NOT NULL,
    order_id         uuid NOT NULL,
    line             smallint NOT NULL CHECK (line >= 0),
    product_id       uuid NOT NULL,
    quantity         integer NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    unit_price_cents bigint NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (tenant_id, order_id, line),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, product_id) REFERENCES products (tenant_id, id)
);

-- The pay saga, one row per order, written before every provider call so a crash leaves a row
-- that says where to resume. Provider idempotency keys are derived from (order_id, step), so a
-- resumed step repeats the same request and the provider answers it without charging again.
CREATE TABLE payments (
    tenant_id        uuid NOT NULL,
    order_id         uuid NOT NULL,
    step             text NOT NULL
                     CHECK (step IN ('authorizing', 'capturing', 'voiding', 'refunding',
                                     'captured', 'voided', 'refunded', 'failed')),
    payment_method   text NOT NULL,
    amount_cents     bigint NOT NULL,
    currency         text NOT NULL,
    authorization_id text,                      -- the provider's id, once authorized
    outcome          text,                      -- why it failed or was compensated
    attempts         integer NOT NULL DEFAULT 0,
    -- The process running the saga holds it until lease_until and renews it at every step; a
    -- saga whose lease ran out (its process died) is picked up by any replica.
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, order_id),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id) ON DELETE CASCADE
);
-- Start-up recovery and the sweeper scan the sagas still in flight.
CREATE INDEX payments_in_flight ON payments (lease_until)
    WHERE step IN ('authorizing', 'capturing', 'voiding', 'refunding');
CREATE UNIQUE INDEX payments_authorization ON payments (authorization_id)
    WHERE authorization_id IS NOT NULL;

-- Idempotency-Key records, per caller: the first request stores its fingerprint and, once
-- done, its response; replays within 24 h get the stored response back.
CREATE TABLE idempotency_keys (
    tenant_id       uuid NOT NULL,
    user_id         uuid NOT NULL,
    key             text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint     bytea NOT NULL,             -- SHA-256 of method, route and body
    response_status integer,                    -- null while the first request runs
    response_body   bytea,
    response_headers jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    PRIMARY KEY (tenant_id, user_id, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Provider webhook events already processed: a repeated event id is acknowledged and ignored.
CREATE TABLE webhook_events (
    event_id    text PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 255),
    event_type  text NOT NULL,
    tenant_id   uuid,
    order_id    uuid,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_received ON webhook_events (received_at);
