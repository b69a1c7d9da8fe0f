// A customer's journey through Surge with the generated TypeScript client and nothing else:
// openapi-fetch's typed GET/POST/PATCH over the `paths` openapi-typescript wrote from
// /openapi.json (tests/clients/generate.py). tests/test_clients.py copies this file beside the
// generated schema.d.ts, type-checks it with tsc (strict) and runs it with node:
//
//     node build/journey.js http://127.0.0.1:8080
//
// The same steps as journey.py: sign up, log in, create users, page through them, PATCH with
// If-Match (then a stale one: 412), add a product, order it with an Idempotency-Key (the
// replay answers the same order), pay, read the order until it is paid, post events, read
// their counts. The last line printed says what was done; exit status 0 only if all held.

import { randomUUID } from "node:crypto";

import createClient from "openapi-fetch";
import type { paths } from "./schema.js";

const PAID_WITHIN_MS = 20_000;
const COUNTED_WITHIN_MS = 10_000;

function check(condition: unknown, what: string, detail?: unknown): asserts condition {
  if (!condition) {
    throw new Error(`${what}: ${JSON.stringify(detail)}`);
  }
}

// openapi-fetch answers { data } for a 2xx, { error } otherwise, and the Response itself.
function expect<T>(
  answer: { data?: T; error?: unknown; response: Response },
  status: number,
): T {
  check(answer.response.status === status, `expected ${status}, got ${answer.response.status}`, answer.error);
  check(answer.data !== undefined, "no body", answer.error);
  return answer.data;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function main(baseUrl: string): Promise<void> {
  const tag = randomUUID().slice(0, 8);
  const password = "correct horse battery";
  const ownerEmail = `ann-${tag}@example.com`;
  const pub = createClient<paths>({ baseUrl });

  const signed = expect(
    await pub.POST("/v1/auth/signup", {
      body: { tenant_name: `Acme ${tag}`, email: ownerEmail, username: "ann", password },
    }),
    201,
  );
  const tokens = expect(
    await pub.POST("/v1/auth/login", {
      body: { tenant_id: signed.tenant.id, email: ownerEmail, password },
    }),
    200,
  );
  const api = createClient<paths>({
    baseUrl,
    headers: { Authorization: `Bearer ${tokens.access_token}` },
  });

  const created: { id: string; etag: string }[] = [];
  for (const name of ["bob", "cleo"]) {
    const answer = await api.POST("/v1/users", {
      body: {
        email: `${name}-${tag}@example.com`,
        username: name,
        password,
        roles: ["member"],
        profile: { team: "mugs", desk: 4 },
      },
    });
    const user = expect(answer, 201);
    check(user.profile["team"] === "mugs" && user.profile["desk"] === 4, "profile", user.profile);
    const etag = answer.response.headers.get("ETag");
    check(etag !== null, "no ETag on 201");
    created.push({ id: user.id, etag });
  }

  // Keyset pagination, one user a page: every user once, the owner and the two created.
  const seen: string[] = [];
  let pages = 0;
  let cursor: string | undefined;
  for (;;) {
    const page = expect(await api.GET("/v1/users", { params: { query: { limit: 1, cursor } } }), 200);
    pages += 1;
    seen.push(...page.items.map((u) => u.id));
    if (page.next_cursor === null) break;
    cursor = page.next_cursor;
  }
  const want = [signed.user.id, ...created.map((u) => u.id)].sort();
  check(JSON.stringify([...seen].sort()) === JSON.stringify(want), "users seen", seen);
  check(pages >= 3, "pages", pages);

  const bob = created[0];
  check(bob !== undefined, "bob");
  const patched = await api.PATCH("/v1/users/{user_id}", {
    params: { path: { user_id: bob.id }, header: { "If-Match": bob.etag } },
    body: { username: "bobby" },
  });
  check(expect(patched, 200).username === "bobby", "patched username");
  check(patched.response.headers.get("ETag") !== bob.etag, "ETag moved on");
  const stale = await api.PATCH("/v1/users/{user_id}", {
    params: { path: { user_id: bob.id }, header: { "If-Match": bob.etag } },
    body: { username: "bob2" },
  });
  check(stale.response.status === 412 && stale.error?.status === 412, "stale If-Match", stale.error);

  const product = expect(
    await api.POST("/v1/products", {
      body: { sku: `mug-${tag}`, name: "Mug", price_cents: 1250, currency: "EUR", stock: 10 },
    }),
    201,
  );
  const cart = { items: [{ product_id: product.id, quantity: 2 }] };
  const ordering = { params: { header: { "Idempotency-Key": `cart-${tag}` } }, body: cart };
  const order = expect(await api.POST("/v1/orders", ordering), 201);
  check(order.total_cents === 2500 && order.status === "pending", "order", order);
  const replay = await api.POST("/v1/orders", ordering);
  check(expect(replay, 201).id === order.id, "replayed order");
  check(replay.response.headers.get("Idempotent-Replayed") === "true", "Idempotent-Replayed");

  const paying = await api.POST("/v1/orders/{order_id}/pay", {
    params: { path: { order_id: order.id }, header: { "Idempotency-Key": `pay-${tag}` } },
    body: { payment_method: "pm_card_visa" },
  });
  check([200, 202].includes(paying.response.status), "pay", paying.error);
  const deadline = Date.now() + PAID_WITHIN_MS;
  let read = order;
  for (;;) {
    read = expect(await api.GET("/v1/orders/{order_id}", { params: { path: { order_id: order.id } } }), 200);
    if (read.status === "paid") break;
    check(read.status === "pending" || read.status === "paying", "order status", read);
    check(Date.now() < deadline, `not paid within ${PAID_WITHIN_MS} ms`, read);
    await sleep(100);
  }

  const start = new Date();
  const ts = start.toISOString();
  const accepted = expect(
    await api.POST("/v1/events", {
      body: {
        events: [0, 1, 2].map(() => ({
          name: "checkout.paid",
          ts,
          props: { order_id: order.id, total_cents: 2500 },
        })),
      },
    }),
    202,
  );
  check(accepted.accepted === 3, "accepted", accepted);
  const query = {
    name: "checkout.paid",
    from: new Date(start.getTime() - 60_000).toISOString(),
    to: new Date(start.getTime() + 120_000).toISOString(),
    bucket: "1m" as const,
  };
  const countedBy = Date.now() + COUNTED_WITHIN_MS;
  let counted = 0;
  for (;;) {
    const counts = expect(await api.GET("/v1/analytics/counts", { params: { query } }), 200);
    counted = counts.buckets.reduce((sum, b) => sum + b.count, 0);
    if (counted === 3) break;
    check(Date.now() < countedBy, `counted ${counted} of 3 within ${COUNTED_WITHIN_MS} ms`);
    await sleep(100);
  }

  console.log(
    `ts journey ok: users=${seen.length} pages=${pages} order=${order.id} status=${read.status} events=${counted}`,
  );
}

const baseUrl = process.argv[2];
check(baseUrl !== undefined, "usage: node build/journey.js BASE_URL");
await main(baseUrl);
