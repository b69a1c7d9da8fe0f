"""A customer's journey through Surge with the generated Python client and nothing else: every
call is a function openapi-python-client wrote from /openapi.json (tests/clients/generate.py).

    PYTHONPATH=<out>/python python tests/clients/journey.py http://127.0.0.1:8080

Sign up, log in, create users, page through them, PATCH with If-Match (then a stale one: 412),
add a product, order it with an Idempotency-Key (the replay answers the same order), pay, read
the order until it is paid, post events, read their counts. Each step checks its status and
its parsed answer; an undocumented status raises (raise_on_unexpected_status), and so does an
undocumented field in an answer. The last line printed says what was done; exit status 0 only
if all of it held.
"""

from __future__ import annotations

import datetime
import secrets
import sys
import time
from typing import Any, TypeVar
from uuid import UUID

import attrs
from surge_client import AuthenticatedClient, Client
from surge_client.api.auth import login, signup
from surge_client.api.catalog import create_product
from surge_client.api.events import get_analytics_counts, post_events
from surge_client.api.orders import create_order, get_order, pay_order
from surge_client.api.users import create_user, list_users, update_user
from surge_client.models import (
    CreateOrderRequest,
    CreateOrderRequestItemsItem,
    CreateProductRequest,
    CreateUserRequest,
    CreateUserRequestProfile,
    CreateUserRequestRolesItem,
    Event,
    EventBatch,
    EventCounts,
    EventProps,
    EventsAccepted,
    GetAnalyticsCountsBucket,
    LoginRequest,
    Order,
    OrderStatus,
    PatchUserRequest,
    PayOrderRequest,
    Problem,
    Product,
    SignupRequest,
    SignupResponse,
    TokenPair,
    User,
    UserPage,
)
from surge_client.types import UNSET, Response

T = TypeVar("T")
PAID_WITHIN_S = 20.0
COUNTED_WITHIN_S = 10.0


def expect(response: Response[Any], status: int, kind: type[T]) -> T:
    """The parsed answer of `kind`, after checking the status."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert isinstance(response.parsed, kind), response.parsed
    undocumented(response.parsed, kind.__name__)
    return response.parsed


def undocumented(value: object, where: str) -> None:
    """No field the document leaves out: the generated models keep such fields aside, in
    additional_properties (a free-form object, with no declared field, is all of them)."""
    if isinstance(value, list):
        for item in value:
            undocumented(item, where)
        return
    cls = type(value)
    if attrs.has(cls):
        declared = [f.name for f in attrs.fields(cls) if f.name != "additional_properties"]
        extra = getattr(value, "additional_properties", {})
        assert not (declared and extra), f"{where}: undocumented {sorted(extra)}"
        for name in declared:
            undocumented(getattr(value, name), f"{where}.{name}")


def main(base_url: str) -> None:
    tag = secrets.token_hex(4)
    password = "correct horse battery"
    owner_email = f"ann-{tag}@example.com"
    public = Client(base_url=base_url, raise_on_unexpected_status=True)

    signed = expect(
        signup.sync_detailed(
            client=public,
            body=SignupRequest(
                tenant_name=f"Acme {tag}", email=owner_email, username="ann", password=password
            ),
        ),
        201,
        SignupResponse,
    )
    tokens = expect(
        login.sync_detailed(
            client=public,
            body=LoginRequest(tenant_id=signed.tenant.id, email=owner_email, password=password),
        ),
        200,
        TokenPair,
    )
    api = AuthenticatedClient(
        base_url=base_url, token=tokens.access_token, raise_on_unexpected_status=True
    )

    created: list[tuple[User, str]] = []
    for name in ("bob", "cleo"):
        answer = create_user.sync_detailed(
            client=api,
            body=CreateUserRequest(
                email=f"{name}-{tag}@example.com",
                username=name,
                password=password,
                roles=[CreateUserRequestRolesItem.MEMBER],
                profile=CreateUserRequestProfile.from_dict({"team": "mugs", "desk": 4}),
            ),
        )
        user = expect(answer, 201, User)
        assert user.profile.to_dict() == {"team": "mugs", "desk": 4}, user.profile
        created.append((user, answer.headers["ETag"]))

    # Keyset pagination, one user a page: every user once, the owner and the two created.
    seen: list[UUID] = []
    pages, cursor = 0, None
    while True:
        page = expect(
            list_users.sync_detailed(
                client=api, limit=1, cursor=UNSET if cursor is None else cursor
            ),
            200,
            UserPage,
        )
        pages += 1
        seen += [u.id for u in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted([signed.user.id, *(u.id for u, _ in created)]), seen
    assert pages >= 3, pages

    bob, etag = created[0]
    patched = update_user.sync_detailed(
        bob.id, client=api, body=PatchUserRequest(username="bobby"), if_match=etag
    )
    assert expect(patched, 200, User).username == "bobby"
    assert patched.headers["ETag"] != etag
    stale = update_user.sync_detailed(
        bob.id, client=api, body=PatchUserRequest(username="bob2"), if_match=etag
    )
    assert expect(stale, 412, Problem).status == 412

    product = expect(
        create_product.sync_detailed(
            client=api,
            body=CreateProductRequest(
                sku=f"mug-{tag}", name="Mug", price_cents=1250, currency="EUR", stock=10
            ),
        ),
        201,
        Product,
    )
    cart = CreateOrderRequest(
        items=[CreateOrderRequestItemsItem(product_id=product.id, quantity=2)]
    )
    order = expect(
        create_order.sync_detailed(client=api, body=cart, idempotency_key=f"cart-{tag}"), 201, Order
    )
    assert order.total_cents == 2500 and order.status == OrderStatus.PENDING, order
    replay = create_order.sync_detailed(client=api, body=cart, idempotency_key=f"cart-{tag}")
    assert expect(replay, 201, Order).id == order.id
    assert replay.headers.get("Idempotent-Replayed") == "true"

    paying = pay_order.sync_detailed(
        order.id,
        client=api,
        body=PayOrderRequest(payment_method="pm_card_visa"),
        idempotency_key=f"pay-{tag}",
    )
    assert paying.status_code in (200, 202), (paying.status_code, paying.content[:500])
    deadline = time.monotonic() + PAID_WITHIN_S
    while True:
        read = expect(get_order.sync_detailed(order.id, client=api), 200, Order)
        if read.status == OrderStatus.PAID:
            break
        assert read.status in (OrderStatus.PENDING, OrderStatus.PAYING), read
        assert time.monotonic() < deadline, f"not paid within {PAID_WITHIN_S} s: {read}"
        time.sleep(0.1)

    start = datetime.datetime.now(datetime.UTC)
    props = EventProps.from_dict({"order_id": str(order.id), "total_cents": 2500})
    events = [Event(name="checkout.paid", ts=start, props=props) for _ in range(3)]
    accepted = expect(
        post_events.sync_detailed(client=api, body=EventBatch(events=events)), 202, EventsAccepted
    )
    assert accepted.accepted == 3, accepted
    deadline = time.monotonic() + COUNTED_WITHIN_S
    while True:
        counts = expect(
            get_analytics_counts.sync_detailed(
                client=api,
                name="checkout.paid",
                from_=start - datetime.timedelta(minutes=1),
                to=start + datetime.timedelta(minutes=2),
                bucket=GetAnalyticsCountsBucket.MINUTE,
            ),
            200,
            EventCounts,
        )
        counted = sum(b.count for b in counts.buckets)
        if counted == 3:
            break
        assert time.monotonic() < deadline, f"counted {counted} of 3 within {COUNTED_WITHIN_S} s"
        time.sleep(0.1)

    print(
        f"python journey ok: users={len(seen)} pages={pages} order={order.id} "
        f"status={read.status.value} events={counted}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
