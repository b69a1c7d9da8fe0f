"""Catalog, orders and payments: products, orders, the payment saga and its provider,
webhooks, idempotency."""
