"""The GraphQL explorer's example query (handlers/graphql/explorer.html) fits the default rate
limit with room to run it several times in a row: a query is charged its cost (the most nodes it
can return) in rate-limit tokens, and an example costing more than the default burst left a
first run at "rate limit left: 0" and a third one refused 429."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any

from handlers.graphql import service
from handlers.graphql.service import GraphQLRequest
from server.app import create_app
from server.config import Config

from .helpers import signup

PAGE = Path(service.__file__).with_name("explorer.html").read_text(encoding="utf-8")
DEFAULTS = Config()
# Runs in a row, from a full bucket, that the example must leave room for.
RUNS = 3


def example() -> tuple[str, dict[str, Any]]:
    """The query and the variables the explorer shows on a first visit, as its script sends them."""
    query = re.search(r"const EXAMPLE = `([^`]*)`;", PAGE)
    variables = re.search(r'<textarea id="vars"[^>]*>([^<]*)</textarea>', PAGE)
    assert query is not None and variables is not None
    return query[1], json.loads(html.unescape(variables[1]) or "{}")


def tokens(query: str, variables: dict[str, Any], config: Config) -> int:
    """What one run takes from the caller's bucket, by the server's own functions: the chain
    takes 1 for the request, service._charge the rest of the query's cost."""
    request = GraphQLRequest(query, variables, None)
    document = service._document(request.query, config)
    operation = service._operation(document, request.operation_name)
    return max(1, service._cost(document, operation, request.variables, config))


def test_the_example_leaves_room_for_several_runs_within_the_default_burst() -> None:
    cost = tokens(*example(), DEFAULTS)
    assert RUNS * cost <= DEFAULTS.rate_limit_burst, (
        f"the explorer's example costs {cost} tokens: {DEFAULTS.rate_limit_burst // cost} run(s)"
        f" within the default burst of {DEFAULTS.rate_limit_burst}"
    )
    # The page tells what a run costs: the figure stays true.
    stated = re.search(r"# Costs (\d+) of your rate limit", example()[0])
    assert stated is not None and int(stated[1]) == cost


async def test_the_example_runs_several_times_in_a_row_at_the_default_burst(
    aiohttp_client: Any, config: Config
) -> None:
    """The explorer's request, as its Run button sends it, against the default burst; the bucket
    refills so slowly here that what each run took shows in RateLimit-Remaining."""
    limited = dataclasses.replace(
        config, rate_limit_burst=DEFAULTS.rate_limit_burst, rate_limit_rate=0.001
    )
    client = await aiohttp_client(create_app(limited))
    owner = await signup(client)
    query, variables = example()
    cost = tokens(query, variables, DEFAULTS)
    left = []
    for _ in range(RUNS):
        resp = await client.post(
            "/graphql", json={"query": query, "variables": variables}, headers=owner.headers
        )
        assert resp.status == 200, await resp.text()
        assert "errors" not in await resp.json()
        left.append(int(resp.headers["RateLimit-Remaining"]))
    burst = DEFAULTS.rate_limit_burst
    assert left == [burst - cost * n for n in range(1, RUNS + 1)]
    assert left[-1] > 0
