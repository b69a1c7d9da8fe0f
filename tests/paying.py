"""A real `python -m server serve` with the fake payment provider beside it, wired as `make run`
wires them: the server calls the provider (PAYMENTS_URL and its key) and the provider sends its
signed webhooks back to the server, so a payment settles the way it does on a development
machine. For tests that drive the server from outside, as a reader of the README would."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.runner import free_port

from .conftest import Services
from .faults import PROVIDER_KEY, PROVIDER_SECRET, provider_proc, wait_listening
from .served import Served, start_process, stop_process, wait_ready


@contextmanager
def serving_with_provider(services: Services, out: Path, **env: str) -> Iterator[Served]:
    """The server (test defaults, `env` over them; the production rate limits) and its provider,
    both stopped on exit. Logs under `out`: stdout/stderr (the server's), provider.log."""
    port = free_port()
    provider_port = free_port()
    while provider_port == port:  # free_port closes its socket: the kernel may hand it out again
        provider_port = free_port()
    provider = provider_proc(provider_port, f"http://127.0.0.1:{port}/v1/webhooks/payments", out)
    provider.start()
    try:
        wait_listening(provider, provider_port)
        proc = start_process(
            services,
            port,
            out,
            PAYMENTS_URL=f"http://127.0.0.1:{provider_port}",
            PAYMENTS_API_KEY=PROVIDER_KEY,
            PAYMENTS_WEBHOOK_SECRET=PROVIDER_SECRET,
            **env,
        )
        inst = Served(proc, port, out / "stdout", out / "stderr")
        try:
            wait_ready(proc, inst.url, inst.stderr)
            yield inst
        finally:
            stop_process(proc)
    finally:
        provider.stop()
