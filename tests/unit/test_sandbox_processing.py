"""The sandbox's job-processing model (``--processing-spread``) and the reads long runs use
(``/_sandbox/timeline``, ``/_sandbox/receipts``, ``resultsFetchedAt``), in process with Starlette's
TestClient. The bench that relies on them is bench/bench_scale.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from sandbox.app import Sandbox
from sandbox.faults import FaultDice, processing_factor
from sandbox.options import Options, Token

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def user(email: str, **custom: Any) -> dict[str, Any]:
    return {"identifiers": {"email": email}, "attributes": {"custom": custom}}


@pytest.fixture
def sandbox() -> Iterator[tuple[Sandbox, TestClient]]:
    sb = Sandbox([Token(KEY)], Options(processing_delay=120.0, processing_spread=0.5, seed=3))
    with TestClient(sb) as client:
        yield sb, client


def test_the_processing_factor_is_a_seeded_lognormal_per_job_number() -> None:
    """Same (seed, job number): same factor; around a median of 1 with the given sigma.

    Bugs caught: delays drawn from a shared generator (a run's delays would depend on what was rolled
    before), a spread that is not centred on the median, a sigma applied twice or not at all.
    """
    factors = [processing_factor(7, seq, 0.5) for seq in range(1, 4001)]
    assert factors == [processing_factor(7, seq, 0.5) for seq in range(1, 4001)]
    assert factors != [processing_factor(8, seq, 0.5) for seq in range(1, 4001)]
    logs = [math.log(f) for f in factors]
    assert abs(statistics.median(logs)) < 0.05
    assert 0.45 < statistics.stdev(logs) < 0.55
    assert processing_factor(None, 5, 0.5) == processing_factor(0, 5, 0.5)


def test_completion_delay_keeps_the_fault_dice_untouched_and_spread_zero_fixed() -> None:
    fixed = Options(processing_delay=2.0)
    spread = Options(processing_delay=2.0, processing_spread=0.5, seed=1)
    a, b = FaultDice(1), FaultDice(1)
    assert [a.completion_delay(fixed, seq) for seq in range(1, 6)] == [2.0] * 5
    assert [a.completion_delay(spread, seq) for seq in range(1, 6)] == [
        2.0 * processing_factor(1, seq, 0.5) for seq in range(1, 6)
    ]
    assert a.rng.random() == b.rng.random()  # the processing model rolled none of the fault dice
    assert Options().updated({"processing_spread": 0.25}).processing_spread == 0.25
    with pytest.raises(ValueError, match="processing_spread"):
        Options().updated({"processing_spread": -1})


def test_jobs_get_their_delay_and_receipts_timeline_and_results_fetches_are_read_incrementally(
    sandbox: tuple[Sandbox, TestClient],
) -> None:
    sb, client = sandbox
    bodies = [
        [user("a@rt.example", vip=True), user("b@bf.example", vip=True, lapsed=True)],
        [user("c@other.example", vip=False)],
        [user("d@bf.example", lapsed=True), user("e@rt.example", vip=True)],
    ]
    ids = []
    for users in bodies:
        response = client.post("/v2/bulk/user/attributes", headers=AUTH, json={"users": users})
        assert response.status_code == 202, response.text
        ids.append(response.json()["batchJobId"])

    jobs = {j["bulkJobId"]: j for j in client.get("/_sandbox/jobs").json()["jobs"]}
    for seq, job_id in enumerate(ids, 1):
        expected = 120.0 * processing_factor(3, seq, 0.5)
        assert jobs[job_id]["processingSeconds"] == pytest.approx(expected, abs=0.01)
        assert jobs[job_id]["resultsFetchedAt"] is None

    params = {"after": 0, "email_domain": "rt.example", "count_domain": "bf.example"}
    got = client.get("/_sandbox/receipts", params=params).json()
    assert got["accepted_total"] == 3 and got["results"] == []
    assert [r["seq"] for r in got["requests"]] == [1, 2, 3]
    first, second, third = got["requests"]
    assert first["emails"] == {"rt.example": ["a@rt.example"]}
    assert first["counts"] == {"bf.example": {"users": 1, "customAttributes": 2}}
    assert "emails" not in second and "counts" not in second
    assert third["counts"] == {"bf.example": {"users": 1, "customAttributes": 1}}
    assert first["batchJobId"] == ids[0] and first["users"] == 2
    later = client.get("/_sandbox/receipts", params={**params, "after": 2}).json()["requests"]
    assert [r["seq"] for r in later] == [3]

    sb.clock.offset += 10_000  # every job falls due
    assert client.get(f"/v2/bulk/job/{ids[1]}", headers=AUTH).json()["status"] == "COMPLETED"
    for _ in range(2):  # a second download is not a second confirmation
        assert client.get(f"/results/{ids[1]}.jsonl").status_code == 200
    results = client.get("/_sandbox/receipts", params={"results_after": 0}).json()["results"]
    assert [r[0] for r in results] == [ids[1]]
    assert client.get("/_sandbox/receipts", params={"results_after": 1}).json()["results"] == []
    assert client.get(f"/_sandbox/jobs/{ids[1]}").json()["resultsFetchedAt"] == results[0][1]

    timeline = client.get("/_sandbox/timeline", params={"token": KEY, "since": 0}).json()
    per_endpoint: dict[str, int] = {}
    for per in timeline["seconds"].values():
        for endpoint, statuses in per.items():
            per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + sum(statuses.values())
    assert per_endpoint == {"POST /v2/bulk/user/attributes": 3, "GET /v2/bulk/job/{bulkJobId}": 1}
    future = client.get("/_sandbox/timeline", params={"token": KEY, "since": int(timeline["now"]) + 5})
    assert future.json()["seconds"] == {}
    assert client.get("/_sandbox/timeline", params={"token": "nobody"}).json()["seconds"] == {}


def test_reset_restarts_job_numbers_so_the_delays_repeat(sandbox: tuple[Sandbox, TestClient]) -> None:
    _sb, client = sandbox

    def delays() -> list[float]:
        for i in range(3):
            body = {"users": [user(f"u{i}@x.example", vip=True)]}
            assert client.post("/v2/bulk/user/attributes", headers=AUTH, json=body).status_code == 202
        return sorted(j["processingSeconds"] for j in client.get("/_sandbox/jobs").json()["jobs"])

    first = delays()
    client.post("/_sandbox/reset")
    assert delays() == first
    assert len(set(first)) == 3
