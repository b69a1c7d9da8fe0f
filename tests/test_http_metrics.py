"""The hand-kept request metrics expose exactly what prometheus-client's objects would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.metrics import (
    IN_FLIGHT_DOC,
    LATENCY_BUCKETS,
    LATENCY_DOC,
    REQUESTS_DOC,
    HttpMetrics,
)

observations = st.lists(
    st.tuples(
        st.sampled_from(["GET", "POST"]),
        st.sampled_from(["/healthz", "/v1/users/{user_id}"]),
        st.sampled_from([200, 404, 503]),
        # bucket bounds themselves included: le means "at most"
        st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 30, allow_nan=False)),
    ),
    max_size=40,
)


@given(observations, st.integers(0, 5))
def test_same_exposition_as_prometheus_client(
    seen: list[tuple[str, str, int, float]], still_running: int
) -> None:
    ours = CollectorRegistry()
    http = HttpMetrics()
    ours.register(http)
    theirs = CollectorRegistry()
    requests = Counter(
        "surge_http_requests_total", REQUESTS_DOC, ["method", "route", "status"], registry=theirs
    )
    latency = Histogram(
        "surge_http_request_duration_seconds", LATENCY_DOC, ["method", "route"],
        buckets=LATENCY_BUCKETS, registry=theirs,
    )  # fmt: skip
    in_flight = Gauge("surge_http_requests_in_flight", IN_FLIGHT_DOC, registry=theirs)
    for method, route, status, seconds in seen:
        meter = http.route(method, route)
        assert http.route(method, route) is meter  # one meter per route, made once
        meter.finished(status, seconds)
        requests.labels(method, route, str(status)).inc()
        latency.labels(method, route).observe(seconds)
    http.route("GET", "/never/answered")  # registered routes with no answer have no series
    for _ in range(still_running):
        http.in_flight += 1  # as the pipeline counts a request it has not answered yet
        in_flight.inc()

    def series(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        # prometheus-client adds a _created series per child; ours has none (it is optional)
        return sorted(line for line in text.splitlines() if "_created" not in line)

    assert series(ours) == series(theirs)
