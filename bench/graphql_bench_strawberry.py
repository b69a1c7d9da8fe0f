"""The bench's 50-order query schema as strawberry types (bench/graphql_bench.py --libs).

No `from __future__ import annotations` here: strawberry resolves the annotations itself."""

from typing import Any

import strawberry
from strawberry.schema.config import StrawberryConfig

DATA: dict[str, Any] = {}


@strawberry.type
class User:
    id: strawberry.ID
    username: str
    email: str


@strawberry.type
class Product:
    id: strawberry.ID
    sku: str
    name: str
    priceCents: int


@strawberry.type
class OrderItem:
    quantity: int
    unitPriceCents: int
    _product: strawberry.Private[str]

    @strawberry.field
    async def product(self) -> Product:
        return Product(**DATA["products"][self._product])


@strawberry.type
class Order:
    id: strawberry.ID
    status: str
    totalCents: int
    currency: str
    createdAt: str
    _user: strawberry.Private[str]
    _items: strawberry.Private[list[dict[str, Any]]]

    @strawberry.field
    async def user(self) -> User:
        return User(**DATA["users"][self._user])

    @strawberry.field
    async def items(self, first: int | None = None) -> list[OrderItem]:
        return [OrderItem(**i) for i in self._items[:first]]


@strawberry.type
class OrderEdge:
    cursor: str
    node: Order


@strawberry.type
class PageInfo:
    hasNextPage: bool
    endCursor: str | None


@strawberry.type
class OrderConnection:
    edges: list[OrderEdge]
    pageInfo: PageInfo


@strawberry.type
class Query:
    @strawberry.field
    async def orders(self, first: int = 50) -> OrderConnection:
        rows = DATA["orders"][:first]
        return OrderConnection(
            edges=[OrderEdge(cursor=o["id"], node=Order(**o)) for o in rows],
            pageInfo=PageInfo(hasNextPage=False, endCursor=rows[-1]["id"]),
        )


def schema(
    orders: list[dict[str, Any]], users: dict[str, Any], products: dict[str, Any]
) -> strawberry.Schema:
    DATA.update(orders=orders, users=users, products=products)
    return strawberry.Schema(query=Query, config=StrawberryConfig(auto_camel_case=False))
