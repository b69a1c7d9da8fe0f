"""Per-request batching (the DataLoader pattern) for the GraphQL read side.

A resolver asks a loader for one key and gets a future at once; every key asked for while the
event loop is still busy with the same level of the query joins one batch, fetched with a single
`= ANY($2)` statement when the loop next goes idle. So a page of 50 orders with their users,
items and products costs four statements (orders, items, users, products), not 151.

Loaders live for one request: they cache what they fetched (one user named by 50 orders is one
row) and never outlive the tenant of the token that made them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar
from uuid import UUID

from db import graphql as gql_db
from db import orders
from db.pool import Database
from handlers.identity.views import user_view
from handlers.orders.views import order_view, product_view

K = TypeVar("K", bound=Hashable)
Node = dict[str, Any]

# REST field name -> GraphQL field name. Nodes are the REST views with their keys renamed, so a
# value can never differ between the two APIs.
_USER_KEYS = {
    "id": "id",
    "tenant_id": "tenantId",
    "email": "email",
    "username": "username",
    "status": "status",
    "roles": "roles",
    "profile": "profile",
    "version": "version",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
}
_PRODUCT_KEYS = {
    "id": "id",
    "tenant_id": "tenantId",
    "sku": "sku",
    "name": "name",
    "price_cents": "priceCents",
    "currency": "currency",
    "stock": "stock",
    "version": "version",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
}
_ORDER_KEYS = {
    "id": "id",
    "tenant_id": "tenantId",
    "user_id": "userId",
    "status": "status",
    "total_cents": "totalCents",
    "currency": "currency",
    "version": "version",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
}


def user_node(row: Any) -> Node:
    view = user_view(row)
    node = {gql: view[rest] for rest, gql in _USER_KEYS.items()}
    node["_id"] = row["id"]
    return node


def product_node(row: Any) -> Node:
    view = product_view(row)
    return {gql: view[rest] for rest, gql in _PRODUCT_KEYS.items()}


def order_node(row: Any) -> Node:
    view = order_view(row, [])
    node = {gql: view[rest] for rest, gql in _ORDER_KEYS.items()}
    payment = view["payment"]
    node["payment"] = (
        None
        if payment is None
        else {"status": payment["status"], "failureCode": payment["failure_code"]}
    )
    node["_id"] = row["id"]
    node["_user_id"] = row["user_id"]
    return node


def item_node(row: Any) -> Node:
    # The same three values order_view renders for a line.
    return {
        "productId": str(row["product_id"]),
        "quantity": row["quantity"],
        "unitPriceCents": row["unit_price_cents"],
        "_product_id": row["product_id"],
    }


class Loader(Generic[K]):
    """Keys asked for in one loop iteration become one call of `batch`; results are cached."""

    def __init__(self, batch: Callable[[list[K]], Awaitable[Mapping[K, Any]]]) -> None:
        self._batch = batch
        self._futures: dict[K, asyncio.Future[Any]] = {}
        self._pending: list[K] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # for tests and the bench: how many statements this loader ran

    def load(self, key: K) -> asyncio.Future[Any]:
        """A future of the node for `key`, or None when the tenant has no such row."""
        fut = self._futures.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._futures[key] = loop.create_future()
            if not self._pending:
                # Two hops: resolvers of one list level run in tasks that the previous batch's
                # results woke in one go; waiting one more iteration lets all of them enqueue.
                loop.call_soon(loop.call_soon, self._dispatch)
            self._pending.append(key)
        return fut

    def prime(self, key: K, value: Any) -> None:
        """Remember a node a list already fetched, so a nested lookup costs no statement."""
        if key not in self._futures:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(value)
            self._futures[key] = fut

    def _dispatch(self) -> None:
        keys, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(keys))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, keys: list[K]) -> None:
        self.batches += 1
        try:
            found = await self._batch(keys)
        except Exception as exc:
            for key in keys:
                fut = self._futures[key]
                if not fut.done():
                    fut.set_exception(exc)
            return
        for key in keys:
            fut = self._futures[key]
            if not fut.done():
                fut.set_result(found.get(key))


class Loaders:
    """The loaders of one request, bound to the caller's tenant."""

    def __init__(self, pg: Database, tenant_id: UUID) -> None:
        self.pg = pg
        self.tenant_id = tenant_id
        self.users: Loader[UUID] = Loader(self._users)
        self.products: Loader[UUID] = Loader(self._products)
        self.orders: Loader[UUID] = Loader(self._orders)
        self.items: Loader[UUID] = Loader(self._items)

    def statements(self) -> int:
        return sum(
            loader.batches for loader in (self.users, self.products, self.orders, self.items)
        )

    async def _users(self, ids: list[UUID]) -> dict[UUID, Node]:
        rows = await gql_db.users_by_ids(self.pg, self.tenant_id, ids)
        return {r["id"]: user_node(r) for r in rows}

    async def _products(self, ids: list[UUID]) -> dict[UUID, Node]:
        rows = await gql_db.products_by_ids(self.pg, self.tenant_id, ids)
        return {r["id"]: product_node(r) for r in rows}

    async def _orders(self, ids: list[UUID]) -> dict[UUID, Node]:
        rows = await gql_db.orders_by_ids(self.pg, self.tenant_id, ids)
        return {r["id"]: order_node(r) for r in rows}

    async def _items(self, order_ids: list[UUID]) -> dict[UUID, list[Node]]:
        lines: dict[UUID, list[Node]] = defaultdict(list)
        for row in await orders.items_of_orders(self.pg, self.tenant_id, order_ids):
            lines[row["order_id"]].append(item_node(row))
        return {order_id: lines.get(order_id, []) for order_id in order_ids}
