import time
from typing import Any

import pytest

from server.app import create_app
from tests.helpers import add_user, signup


@pytest.mark.parametrize("i", range(5))
async def test_probe(aiohttp_client: Any, config: Any, i: int) -> None:
    t = time.perf_counter()
    client = await aiohttp_client(create_app(config))
    t1 = time.perf_counter()
    o = await signup(client)
    t2 = time.perf_counter()
    await add_user(client, o, ["admin"])
    t3 = time.perf_counter()
    print(f"start {t1 - t:.3f} signup {t2 - t1:.3f} add {t3 - t2:.3f}")
