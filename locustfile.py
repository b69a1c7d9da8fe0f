"""Load scenarios for any Surge deployment.

    locust -f locustfile.py --host http://127.0.0.1:8080 --headless -u 50 -r 10 -t 1m --csv out
    locust -f locustfile.py --host ... FrontendUser   # one scenario, or --tags admin alone

Weights follow real traffic: mostly frontend users browsing, some event-sending clients, few
admins. `--tags flood` is the noisy-neighbour case instead: half the users are one tenant
hammering user-by-id with no think time (FloodUser, left out unless the tag or the class is
named), the rest frontend users reading beside it. Every user signs up its own tenant on start
(argon2 makes that deliberately slow), so
ramp up gently; against a shared deployment raise AUTH_RATE_LIMIT_PER_MINUTE or the signups
from one load-generator IP will be refused with 429.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from typing import Any, ClassVar

from gevent.lock import Semaphore
from locust import FastHttpUser, between, constant, events, tag, task
from locust.env import Environment
from locust.user.task import filter_tasks_by_tags

PASSWORD = "load-test password"
_seq = itertools.count()
_run = uuid.uuid4().hex[:8]


def _unique(prefix: str) -> str:
    return f"{prefix}{_run}{os.getpid()}x{next(_seq)}"


@events.init.add_listener
def _drop_untagged_scenarios(environment: Environment, **_: Any) -> None:
    """`--tags admin` alone runs the scenarios that have admin tasks: a class the tags leave
    without tasks is dropped instead of failing every spawn with "No tasks defined"."""
    options = environment.parsed_options
    tags = set(getattr(options, "tags", None) or ())
    exclude = set(getattr(options, "exclude_tags", None) or ())
    named = set(getattr(options, "user_classes", None) or ())
    if "flood" not in tags and "FloodUser" not in named:  # the flood only when asked for
        environment.user_classes[:] = [u for u in environment.user_classes if u is not FloodUser]
    if not tags and not exclude:
        return
    for user_class in environment.user_classes:
        filter_tasks_by_tags(user_class, tags or None, exclude or None)
    kept = [u for u in environment.user_classes if u.tasks]
    if kept:  # none left: let locust say so in its own words
        environment.user_classes[:] = kept


class SurgeUser(FastHttpUser):
    abstract = True
    token = ""
    refresh_token = ""
    tenant_id = ""
    user_ids: list[str]

    def _check(self, resp: Any, *expected: int) -> Any:
        if resp.status_code not in expected:
            resp.failure(f"{resp.status_code}: {resp.text[:200]}")
            return None
        resp.success()
        return resp.json() if resp.text else None

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def signup(self) -> None:
        name = _unique("lt")
        with self.client.post(
            "/v1/auth/signup",
            json={
                "tenant_name": f"load {name}",
                "email": f"{name}@example.com",
                "username": name,
                "password": PASSWORD,
            },
            catch_response=True,
            name="/v1/auth/signup",
        ) as resp:
            body = self._check(resp, 201)
        if body:
            self.token = body["access_token"]
            self.refresh_token = body["refresh_token"]
            self.tenant_id = body["tenant"]["id"]
            self.email = body["user"]["email"]
            self.me = body["user"]["id"]
            self.user_ids = [self.me]


class FrontendUser(SurgeUser):
    """Signs up, logs in, browses and searches users, edits its profile, refreshes its token,
    orders and pays (tag `shop` runs only that)."""

    product_id: str | None = None

    weight = 6
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.signup()
        with self.client.post(
            "/v1/auth/login",
            json={"tenant_id": self.tenant_id, "email": self.email, "password": PASSWORD},
            catch_response=True,
            name="/v1/auth/login",
        ) as resp:
            body = self._check(resp, 200)
        if body:
            self.token, self.refresh_token = body["access_token"], body["refresh_token"]
        # The signed-up user owns its tenant, so it can stock a product to order.
        with self.client.post(
            "/v1/products",
            json={
                "sku": _unique("sku"),
                "name": "Load-test mug",
                "price_cents": random.randint(100, 5000),
                "currency": "EUR",
                "stock": 1_000_000,
            },
            headers=self.auth(),
            catch_response=True,
            name="/v1/products [create]",
        ) as resp:
            product = self._check(resp, 201)
        self.product_id = product["id"] if product else None

    @tag("frontend", "shop")
    @task(3)
    def order_and_pay(self) -> None:
        """Create an order, pay it (202 while the saga runs), look at it; keys make retries safe."""
        if self.product_id is None:
            return
        with self.client.post(
            "/v1/orders",
            json={"items": [{"product_id": self.product_id, "quantity": random.randint(1, 3)}]},
            headers={**self.auth(), "Idempotency-Key": _unique("order")},
            catch_response=True,
            name="/v1/orders",
        ) as resp:
            order = self._check(resp, 201)
        if not order:
            return
        with self.client.post(
            f"/v1/orders/{order['id']}/pay",
            json={"payment_method": random.choice(["pm_card_visa"] * 9 + ["pm_card_declined"])},
            headers={**self.auth(), "Idempotency-Key": _unique("pay")},
            catch_response=True,
            name="/v1/orders/{id}/pay",
        ) as resp:
            self._check(resp, 202, 200)
        with self.client.get(
            f"/v1/orders/{order['id']}",
            headers=self.auth(),
            catch_response=True,
            name="/v1/orders/{id}",
        ) as resp:
            self._check(resp, 200)

    @tag("frontend", "flood")
    @task(10)
    def browse(self) -> None:
        with self.client.get(
            "/v1/users?limit=50", headers=self.auth(), catch_response=True, name="/v1/users"
        ) as resp:
            body = self._check(resp, 200)
        if body:
            self.user_ids = [u["id"] for u in body["items"]] or self.user_ids

    @tag("frontend")
    @task(3)
    def search(self) -> None:
        with self.client.get(
            "/v1/users?q=lt&limit=20", headers=self.auth(), catch_response=True, name="/v1/users?q"
        ) as resp:
            self._check(resp, 200)

    @tag("frontend", "flood")
    @task(20)
    def view_user(self) -> None:
        uid = random.choice(self.user_ids)
        with self.client.get(
            f"/v1/users/{uid}", headers=self.auth(), catch_response=True, name="/v1/users/{id}"
        ) as resp:
            body = self._check(resp, 200)
            if body and body["id"] != uid:
                resp.failure(f"asked for {uid}, got {body['id']}")

    @tag("frontend", "flood")
    @task(5)
    def me(self) -> None:
        with self.client.get(
            "/v1/me", headers=self.auth(), catch_response=True, name="/v1/me"
        ) as resp:
            self._check(resp, 200)

    @tag("frontend")
    @task(2)
    def edit_profile(self) -> None:
        with self.client.get(
            f"/v1/users/{self.me}", headers=self.auth(), catch_response=True, name="/v1/users/{id}"
        ) as resp:
            self._check(resp, 200)
            version = resp.headers.get("ETag", '"1"')
        with self.client.patch(
            f"/v1/users/{self.me}",
            json={"profile": {"theme": random.choice(["dark", "light"]), "at": time.time()}},
            headers={**self.auth(), "If-Match": version},
            catch_response=True,
            name="PATCH /v1/users/{id}",
        ) as resp:
            self._check(resp, 200, 412)  # 412: another tab won the race; the client re-reads

    @tag("frontend")
    @task(1)
    def refresh(self) -> None:
        with self.client.post(
            "/v1/auth/refresh",
            json={"refresh_token": self.refresh_token},
            catch_response=True,
            name="/v1/auth/refresh",
        ) as resp:
            body = self._check(resp, 200)
        if body:
            self.token, self.refresh_token = body["access_token"], body["refresh_token"]


class AdminUser(SurgeUser):
    """Creates users, grants and revokes roles, deletes users."""

    weight = 1
    wait_time = between(0.5, 2)

    def on_start(self) -> None:
        self.signup()

    @tag("admin")
    @task(3)
    def create_user(self) -> None:
        name = _unique("member")
        with self.client.post(
            "/v1/users",
            json={"email": f"{name}@example.com", "username": name, "password": PASSWORD},
            headers=self.auth(),
            catch_response=True,
            name="/v1/users [create]",
        ) as resp:
            body = self._check(resp, 201)
        if body:
            self.user_ids.append(body["id"])

    @tag("admin")
    @task(2)
    def grant_and_revoke(self) -> None:
        if len(self.user_ids) < 2:
            return
        uid = random.choice(self.user_ids[1:])
        for method in ("PUT", "DELETE"):
            with self.client.request(
                method,
                f"/v1/users/{uid}/roles/admin",
                headers=self.auth(),
                catch_response=True,
                name=f"{method} /v1/users/{{id}}/roles/{{role}}",
            ) as resp:
                self._check(resp, 204)

    @tag("admin")
    @task(1)
    def delete_user(self) -> None:
        if len(self.user_ids) < 3:
            return
        uid = self.user_ids.pop()
        with self.client.delete(
            f"/v1/users/{uid}",
            headers=self.auth(),
            catch_response=True,
            name="DELETE /v1/users/{id}",
        ) as resp:
            self._check(resp, 204)

    @tag("admin")
    @task(2)
    def audit_the_list(self) -> None:
        with self.client.get(
            "/v1/users?status=deleted",
            headers=self.auth(),
            catch_response=True,
            name="/v1/users?status",
        ) as resp:
            self._check(resp, 200)


class EventClient(SurgeUser):
    """Sends batches of analytics events, as a frontend SDK would."""

    weight = 3
    wait_time = between(0.2, 1)

    def on_start(self) -> None:
        self.signup()

    @tag("events")
    @task
    def send_events(self) -> None:
        n = random.choice([1, 10, 100])
        events = [
            {"name": random.choice(["page_view", "click", "signup_step"]), "props": {"i": i}}
            for i in range(n)
        ]
        with self.client.post(
            "/v1/events",
            json={"events": events},
            headers=self.auth(),
            catch_response=True,
            name="/v1/events",
        ) as resp:
            body = self._check(resp, 202)
            if body and body.get("accepted") != n:
                resp.failure(f"sent {n}, accepted {body.get('accepted')}")


class FloodUser(SurgeUser):
    """One noisy tenant: every FloodUser shares the first one's signup and reads user-by-id back
    to back, no think time. Refusals (503, 429) with Retry-After are the server protecting the
    other tenants, so they count as successes under their own names ("[flood refused 503]");
    anything else is a failure. The frontend users beside it (`--tags flood`) must keep
    answering 200: a failure there is a neighbour hurt by the flood."""

    weight = 6  # with FrontendUser's 6: half the users flood under `--tags flood`
    wait_time = constant(0)
    shared: ClassVar[dict[str, str]] = {}
    _signing_up = Semaphore()

    def on_start(self) -> None:
        with FloodUser._signing_up:  # the first one signs the tenant up, the others wait for it
            if not FloodUser.shared:
                self.signup()
                if self.token:
                    FloodUser.shared = {"token": self.token, "me": self.me}
        self.token = FloodUser.shared.get("token", "")
        self.user_ids = [FloodUser.shared["me"]] if FloodUser.shared else []

    @tag("flood")
    @task
    def hammer(self) -> None:
        if not self.user_ids:
            return
        with self.client.get(
            f"/v1/users/{self.user_ids[0]}",
            headers=self.auth(),
            catch_response=True,
            name="/v1/users/{id} [flood]",
        ) as resp:
            if resp.status_code in (429, 503) and resp.headers.get("Retry-After"):
                resp.request_meta["name"] = f"/v1/users/{{id}} [flood refused {resp.status_code}]"
                resp.success()
            else:
                self._check(resp, 200)
