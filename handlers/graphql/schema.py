"""The GraphQL schema (SDL), its resolvers, and the static checks a query passes before it runs:
depth, cost (the most nodes it can return) and argument ranges.

Built on graphql-core directly (docs/PERFORMANCE.md has the measurement against strawberry and
ariadne). Nodes are dicts (loaders.py), so graphql-core's default resolver reads
scalar fields by key; only fields that load something have a resolver here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLObjectType,
    GraphQLResolveInfo,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    build_schema,
    get_named_type,
)
from graphql.execution.values import VariableValues, get_argument_values

from db import users as users_db
from db.ids import parse_uuid
from db.orders import list_orders
from db.pool import Database
from handlers.graphql.loaders import Loaders, Node, order_node, user_node
from server.http import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, encode_cursor, parse_cursor

MAX_ORDER_ITEMS = 100  # CreateOrderRequest's maxItems: what `items` counts when not told less

SDL = '''"""
Surge's read side. Every query sees only the caller's tenant; ids of another tenant are not
found. Field values are the REST API's (GET /v1/...), with camelCase names.
"""
schema {
  query: Query
}

"RFC 3339 UTC timestamp with milliseconds, e.g. 2026-11-21T10:00:00.123Z"
scalar DateTime

"Money in integer minor units (cents); may exceed 32 bits, so not an Int"
scalar Cents

"Any JSON value"
scalar JSON

type Query {
  "The caller"
  me: User!
  "A user of the caller's tenant; null (with a NOT_FOUND error) if there is none"
  user(id: ID!): User
  "The tenant's users (not deleted), oldest first; q: a case-insensitive prefix of username/email"
  users(first: Int = 50, after: String, q: String): UserConnection!
  "The tenant's orders, oldest first; the cursors are the REST ones (next_cursor)"
  orders(first: Int = 50, after: String, status: OrderStatus): OrderConnection!
  "An order of the caller's tenant; null (with a NOT_FOUND error) if there is none"
  order(id: ID!): Order
}

type User {
  id: ID!
  tenantId: ID!
  email: String!
  username: String!
  status: UserStatus!
  roles: [String!]!
  profile: JSON!
  version: Int!
  createdAt: DateTime!
  updatedAt: DateTime!
}

enum UserStatus {
  active
  suspended
  deleted
}

type Order {
  id: ID!
  tenantId: ID!
  userId: ID!
  "Who placed it"
  user: User!
  status: OrderStatus!
  "The lines in order; first: at most this many (1..100), default all of them"
  items(first: Int): [OrderItem!]!
  totalCents: Cents!
  currency: String!
  "null before the first pay"
  payment: Payment
  version: Int!
  createdAt: DateTime!
  updatedAt: DateTime!
}

enum OrderStatus {
  pending
  paying
  paid
  payment_failed
  cancelled
}

type OrderItem {
  productId: ID!
  product: Product!
  quantity: Int!
  unitPriceCents: Cents!
}

type Payment {
  status: PaymentStatus!
  failureCode: String
}

enum PaymentStatus {
  authorizing
  capturing
  captured
  voiding
  voided
  refunding
  refunded
  failed
}

type Product {
  id: ID!
  tenantId: ID!
  sku: String!
  name: String!
  priceCents: Cents!
  currency: String!
  "What is still available after reservations"
  stock: Int!
  version: Int!
  createdAt: DateTime!
  updatedAt: DateTime!
}

type PageInfo {
  hasNextPage: Boolean!
  "The last edge's cursor; pass it as `after` for the next page"
  endCursor: String
}

type UserConnection {
  edges: [UserEdge!]!
  pageInfo: PageInfo!
}

type UserEdge {
  cursor: String!
  node: User!
}

type OrderConnection {
  edges: [OrderEdge!]!
  pageInfo: PageInfo!
}

type OrderEdge {
  cursor: String!
  node: Order!
}
'''


@dataclass(slots=True)
class Context:
    pg: Database
    tenant_id: UUID
    user_id: UUID
    loaders: Loaders


Info = GraphQLResolveInfo[Context]


def _error(message: str, code: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": code})


def not_found(what: str) -> GraphQLError:
    return _error(f"no such {what} in your tenant", "NOT_FOUND")


def _after(raw: str | None) -> UUID | None:
    # Already checked by `measure`; None here means no cursor.
    return None if raw is None else parse_cursor(raw)


def _connection(nodes: list[Node], ids: list[UUID], first: int) -> Node:
    edges = [
        {"cursor": encode_cursor(i), "node": n}
        for i, n in zip(ids[:first], nodes[:first], strict=True)
    ]
    return {
        "edges": edges,
        "pageInfo": {
            "hasNextPage": len(nodes) > first,
            "endCursor": edges[-1]["cursor"] if edges else None,
        },
    }


def _me(_root: None, info: Info) -> Awaitable[Any]:
    ctx = info.context
    return ctx.loaders.users.load(ctx.user_id)


async def _user(_root: None, info: Info, id: str) -> Node:
    ctx = info.context
    user_id = parse_uuid(id)
    node = None if user_id is None else await ctx.loaders.users.load(user_id)
    if node is None:
        raise not_found("user")
    return node  # type: ignore[no-any-return]


async def _users(
    _root: None,
    info: Info,
    first: int = DEFAULT_PAGE_SIZE,
    after: str | None = None,
    q: str | None = None,
) -> Node:
    ctx = info.context
    pattern = users_db.prefix_pattern(q) if q else None
    rows = await users_db.list_users(ctx.pg, ctx.tenant_id, _after(after), pattern, None, first + 1)
    nodes = [user_node(r) for r in rows]
    for n in nodes[:first]:
        ctx.loaders.users.prime(n["_id"], n)
    return _connection(nodes, [r["id"] for r in rows], first)


def _wanted(info: Info) -> set[str]:
    """Every field name asked for under this field (through fragments too)."""
    names: set[str] = set()
    spread: set[str] = set()

    def visit(selection_set: SelectionSetNode) -> None:
        for sel in selection_set.selections:
            if isinstance(sel, FieldNode):
                names.add(sel.name.value)
                if sel.selection_set is not None:
                    visit(sel.selection_set)
            elif isinstance(sel, InlineFragmentNode):
                visit(sel.selection_set)
            elif isinstance(sel, FragmentSpreadNode) and sel.name.value not in spread:
                spread.add(sel.name.value)
                visit(info.fragments[sel.name.value].selection_set)

    for node in info.field_nodes:
        if node.selection_set is not None:
            visit(node.selection_set)
    return names


async def _hydrate(ctx: Context, orders: list[Node], wanted: set[str]) -> None:
    """Attach the users, lines and products the query asks for to a list of orders, in one
    batched statement per kind, before graphql-core walks them.

    Resolving them field by field with awaitables works too (the loaders batch either way), but
    graphql-core then completes every nested value asynchronously, which costs far more CPU;
    with everything attached, the whole subtree completes synchronously."""
    loaders = ctx.loaders
    users = [loaders.users.load(o["_user_id"]) for o in orders] if "user" in wanted else []
    items = [loaders.items.load(o["_id"]) for o in orders] if "items" in wanted else []
    got_users = await asyncio.gather(*users)
    got_items: list[list[Node]] = await asyncio.gather(*items)
    for order, user in zip(orders, got_users, strict=False):
        order["user"] = user
    for order, lines in zip(orders, got_items, strict=False):
        order["items"] = lines
    if got_items and "product" in wanted:
        lines = [line for order_lines in got_items for line in order_lines]
        products = await asyncio.gather(*(loaders.products.load(i["_product_id"]) for i in lines))
        for line, product in zip(lines, products, strict=True):
            line["product"] = product


async def _orders(
    _root: None,
    info: Info,
    first: int = DEFAULT_PAGE_SIZE,
    after: str | None = None,
    status: str | None = None,
) -> Node:
    ctx = info.context
    rows = await list_orders(ctx.pg, ctx.tenant_id, _after(after), status, first + 1)
    nodes = [order_node(r) for r in rows]
    await _hydrate(ctx, nodes[:first], _wanted(info))
    return _connection(nodes, [r["id"] for r in rows], first)


async def _order(_root: None, info: Info, id: str) -> Node:
    ctx = info.context
    order_id = parse_uuid(id)
    node = None if order_id is None else await ctx.loaders.orders.load(order_id)
    if node is None:
        raise not_found("order")
    await _hydrate(ctx, [node], _wanted(info))
    return node  # type: ignore[no-any-return]


def _order_items(order: Node, info: Info, first: int | None = None) -> list[Node]:
    lines: list[Node] = order["items"]  # attached by _hydrate
    return lines if first is None else lines[:first]


def build() -> GraphQLSchema:
    schema = build_schema(SDL)
    resolvers = {
        ("Query", "me"): _me,
        ("Query", "user"): _user,
        ("Query", "users"): _users,
        ("Query", "orders"): _orders,
        ("Query", "order"): _order,
        ("Order", "items"): _order_items,
    }
    for (type_name, field_name), resolve in resolvers.items():
        object_type = schema.type_map[type_name]
        assert isinstance(object_type, GraphQLObjectType)
        object_type.fields[field_name].resolve = resolve
    # DateTime, Cents and JSON keep graphql-core's default scalar behaviour, the identity: the
    # REST views have rendered the values already (timestamps as strings, cents as ints).
    return schema


SCHEMA = build()

# -- static checks: run on the document before anything executes --------------------------------

# Types whose objects count as nodes; connections, edges, PageInfo and Payment are structure.
NODE_TYPES = frozenset({"User", "Order", "OrderItem", "Product"})


class QueryRefused(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(slots=True)
class Measure:
    depth: int
    cost: int


def _list_bound(type_name: str, field_name: str, args: dict[str, Any]) -> int:
    """How many elements a list field can return, checking the argument that bounds it."""
    if type_name == "Query" and field_name in ("users", "orders"):
        first = args.get("first")
        if first is None or not 1 <= first <= MAX_PAGE_SIZE:
            raise QueryRefused(
                f"`first` of {field_name} must be from 1 to {MAX_PAGE_SIZE}", "BAD_USER_INPUT"
            )
        after = args.get("after")
        if after is not None and parse_cursor(after) is None:
            raise QueryRefused(
                f"`after` of {field_name} is not a cursor this API returned", "BAD_USER_INPUT"
            )
        q = args.get("q")
        if q is not None and (not 1 <= len(q) <= 254 or "\x00" in q):
            raise QueryRefused("`q` must be 1 to 254 characters, without NUL", "BAD_USER_INPUT")
        return int(first)
    if type_name == "Order" and field_name == "items":
        first = args.get("first")
        if first is None:
            return MAX_ORDER_ITEMS
        if not 1 <= first <= MAX_ORDER_ITEMS:
            raise QueryRefused(
                f"`first` of items must be from 1 to {MAX_ORDER_ITEMS}", "BAD_USER_INPUT"
            )
        return int(first)
    return 1


def measure(
    schema: GraphQLSchema,
    operation: OperationDefinitionNode,
    fragments: dict[str, FragmentDefinitionNode],
    variables: VariableValues,
    max_depth: int,
) -> Measure:
    """Depth and cost of a validated operation; QueryRefused for an argument out of range.

    Cost is the most nodes (User, Order, OrderItem, Product objects) the query can return: a
    connection multiplies what is under it by `first`, `items` by its `first` or 100, and
    fields asked twice (aliases, fragments) count twice. Introspection (`__schema`, `__type`,
    `__typename`) counts for neither: graphql-core's MaxIntrospectionDepthRule bounds it.
    """
    root = schema.query_type
    assert root is not None
    # A fragment spread many times is walked once per depth: without this, fragments spreading
    # fragments three times each make the walk exponential in a 16 KiB document.
    memo: dict[tuple[str, int], tuple[int, int]] = {}

    def walk(
        selection_set: SelectionSetNode, parent: GraphQLObjectType, depth: int, seen: frozenset[str]
    ) -> tuple[int, int]:
        deepest, cost = depth, 0
        for sel in selection_set.selections:
            if isinstance(sel, FieldNode):
                name = sel.name.value
                if name.startswith("__"):
                    continue
                if depth + 1 > max_depth:
                    raise QueryRefused(
                        f"the query is nested deeper than {max_depth} levels", "QUERY_TOO_DEEP"
                    )
                field = parent.fields[name]
                args = get_argument_values(field, sel, variables) if field.args else {}
                bound = _list_bound(parent.name, name, args)
                named = get_named_type(field.type)
                own = 1 if named.name in NODE_TYPES else 0
                sub_depth, sub_cost = depth + 1, 0
                if sel.selection_set is not None and isinstance(named, GraphQLObjectType):
                    sub_depth, sub_cost = walk(sel.selection_set, named, depth + 1, seen)
                deepest = max(deepest, sub_depth)
                cost += bound * (own + sub_cost)
            elif isinstance(sel, InlineFragmentNode):
                target = parent
                if sel.type_condition is not None:
                    found = schema.type_map[sel.type_condition.name.value]
                    assert isinstance(found, GraphQLObjectType)
                    target = found
                d, c = walk(sel.selection_set, target, depth, seen)
                deepest, cost = max(deepest, d), cost + c
            elif isinstance(sel, FragmentSpreadNode):
                name = sel.name.value
                if name in seen:  # validation refuses cycles; never loop regardless
                    continue
                known = memo.get((name, depth))
                if known is None:
                    fragment = fragments[name]
                    found = schema.type_map[fragment.type_condition.name.value]
                    assert isinstance(found, GraphQLObjectType)
                    known = memo[(name, depth)] = walk(
                        fragment.selection_set, found, depth, seen | {name}
                    )
                deepest, cost = max(deepest, known[0]), cost + known[1]
        return deepest, cost

    depth, cost = walk(operation.selection_set, root, 0, frozenset())
    return Measure(depth, cost)
