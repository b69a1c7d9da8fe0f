"""The JSON shapes of products, orders and audit entries (API.md), one function each."""

from __future__ import annotations

from typing import Any

from asyncpg import Record

from server.http import timestamp


def product_view(row: Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "sku": row["sku"],
        "name": row["name"],
        "price_cents": row["price_cents"],
        "currency": row["currency"],
        "stock": row["stock"],
        "version": row["version"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
    }


def order_view(row: Record, items: list[Record], payment: Record | None = None) -> dict[str, Any]:
    """An order with its items; its payment from `payment` when given, else from the order
    row's own payment columns."""
    if payment is not None:
        step, outcome = payment["step"], payment["outcome"]
    else:
        step = row.get("payment_step")
        outcome = row.get("payment_outcome")
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "user_id": str(row["user_id"]),
        "status": row["status"],
        "items": [
            {
                "product_id": str(i["product_id"]),
                "quantity": i["quantity"],
                "unit_price_cents": i["unit_price_cents"],
            }
            for i in items
        ],
        "total_cents": row["total_cents"],
        "currency": row["currency"],
        "payment": None if step is None else {"status": step, "failure_code": outcome},
        "version": row["version"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
    }


def audit_view(row: Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "actor_id": None if row["actor_id"] is None else str(row["actor_id"]),
        "action": row["action"],
        "target_type": row["target_type"],
        "target_id": None if row["target_id"] is None else str(row["target_id"]),
        "request_id": row["request_id"],
        "details": row["details"],
        "created_at": timestamp(row["created_at"]),
    }
