"""``attentive-export trace JOB USER``: one user's changes followed through every stage (fakeredis,
the real flush and poll against a scripted Attentive)."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

import worker.cli.main as cli
from worker.mapping.transitions import read_time_ms
from worker.observe import trace as tr
from worker.pipeline import deliveries
from worker.pipeline.flush import flush_job
from worker.setup.jobs import JobNotFound
from worker.store import keys

from .pipeline_kit import AT, Pipeline, enter, exit_

LATER = "2026-11-26T18:00:00Z"


@pytest.fixture
def pipe(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    return Pipeline(fake_redis, monkeypatch)


def ms(iso: str) -> int:
    value = read_time_ms(iso)
    assert isinstance(value, int)
    return value


def where(pipe: Pipeline, job_id: str, user: str) -> dict[str, tuple[str, Any]]:
    got = tr.trace_user(pipe.redis, job_id, user)
    return {a.audience: (a.where, a) for a in got.audiences}


def test_a_user_followed_from_open_batch_to_delivery(pipe: Pipeline) -> None:
    job = pipe.create_job()
    assert where(pipe, job.id, "ada@x.io")["vip"][0] == tr.NONE

    pipe.ingest(enter("Ada@X.io", "vip"))
    # The key is the job's key field (email) normalised like the identifier: any case finds it.
    got = tr.trace_user(pipe.redis, job.id, "ADA@x.io")
    assert got.user == "ada@x.io"
    vip, lapsed = got.audiences
    assert (vip.where, vip.event, vip.last_event_ms) == (tr.OPEN, "enter", ms(AT))
    assert (lapsed.where, lapsed.last_event_ms) == (tr.NONE, None)

    [bid] = pipe.buffer(job).seal_now()
    vip = where(pipe, job.id, "ada@x.io")["vip"][1]
    assert (vip.where, vip.batch_id, vip.batch_state) == (tr.SEALED, bid, "sealed")

    pipe.attentive.statuses["aj-1"] = ["IN_PROGRESS"]
    flush_job(pipe.rt, job.id)
    vip = where(pipe, job.id, "ada@x.io")["vip"][1]
    assert (vip.where, vip.batch_id) == (tr.AT_ATTENTIVE, bid)
    assert vip.attentive_job == tr.AttentiveJob("aj-1", "unfinished")
    assert vip.since_ms is not None and "aj-1" in vip.detail

    # Newer changes wait behind the unfinished Attentive job; the batch still carries the enter.
    pipe.ingest(exit_("ada@x.io", "vip", LATER), enter("ada@x.io", "lapsed", LATER))
    now = where(pipe, job.id, "ada@x.io")
    for audience, event in (("vip", "exit"), ("lapsed", "enter")):
        state, aud = now[audience]
        assert (state, aud.event, aud.last_event_ms, aud.batch_id) == (tr.HELD, event, ms(LATER), bid)
        assert "aj-1" in aud.detail and "unfinished" in aud.detail

    pipe.check(job, bid)  # still IN_PROGRESS: nothing moves
    assert where(pipe, job.id, "ada@x.io")["vip"][0] == tr.HELD
    pipe.attentive.statuses["aj-1"] = ["COMPLETED"]
    pipe.check(job, bid)
    # Batch 1 completed: the held changes moved into the open batch; the delivery is in the history.
    now = where(pipe, job.id, "ada@x.io")
    assert now["vip"][0] == now["lapsed"][0] == tr.OPEN
    assert now["vip"][1].event == "exit"
    assert deliveries.last_delivery(pipe.redis, job.id, "ada@x.io") == deliveries.Delivery(
        bid,
        deliveries.last_delivery(pipe.redis, job.id, "ada@x.io").at_ms,
        "aj-1",  # type: ignore[union-attr]
    )

    [bid2] = pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    pipe.check(job, bid2)
    got = tr.trace_user(pipe.redis, job.id, "ada@x.io")
    assert [a.where for a in got.audiences] == [tr.DELIVERED, tr.DELIVERED]
    assert got.last_delivery is not None and (
        got.last_delivery.batch_id,
        got.last_delivery.attentive_job_id,
    ) == (
        bid2,
        "aj-2",
    )
    assert "batch 2" in got.audiences[0].detail and "aj-2" in got.audiences[0].detail

    # Without the (bounded) history, nothing pending and no dead letter is all that is known.
    pipe.redis.delete(keys.job_deliveries(job.id))
    got = tr.trace_user(pipe.redis, job.id, "ada@x.io")
    assert [a.where for a in got.audiences] == [tr.NOT_PENDING, tr.NOT_PENDING]
    assert "delivered or not pending" in got.audiences[0].detail


def test_a_refused_user_shows_as_dead_lettered_with_the_reason(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.attentive.refuse_containing("bad@x.io")
    pipe.ingest(enter("bad@x.io", "vip"), enter("good@x.io", "vip"))
    pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    bad = tr.trace_user(pipe.redis, job.id, "bad@x.io")
    vip, lapsed = bad.audiences
    assert vip.where == tr.DEADLETTERED and vip.event == "enter"
    assert vip.reason is not None and vip.reason.startswith("attentive_400: Invalid email address")
    assert lapsed.where == tr.NONE  # the dead letter carried vip only
    assert [d["user"] for d in bad.deadletters] == ["bad@x.io"] and "record" not in bad.deadletters[0]
    assert where(pipe, job.id, "good@x.io")["vip"][0] == tr.AT_ATTENTIVE


def test_a_record_refused_in_the_results_file_is_dead_lettered_not_delivered(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.attentive.record_failures["bad@x.io"] = (400, "Invalid phone")
    pipe.ingest(enter("bad@x.io", "vip"), enter("good@x.io", "vip"))
    [bid] = pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    pipe.check(job, bid)
    assert where(pipe, job.id, "good@x.io")["vip"][0] == tr.DELIVERED
    bad = where(pipe, job.id, "bad@x.io")["vip"][1]
    assert bad.where == tr.DEADLETTERED and "Invalid phone" in (bad.reason or "")


def test_a_send_being_made_and_a_send_with_no_answer(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.ingest(enter("ada@x.io", "vip"))
    buffer = pipe.buffer(job)
    [bid] = buffer.seal_now()
    claimed = buffer.claim(60_000)
    assert claimed is not None and claimed.batch_id == bid
    assert where(pipe, job.id, "ada@x.io")["vip"][0] == tr.SENDING
    buffer.record_accepted(bid, {"id": "unknown:abc", "idx": [0], "until": 4_102_444_800_000})
    buffer.mark_submitted(claimed, 4_102_444_800_000)
    vip = where(pipe, job.id, "ada@x.io")["vip"][1]
    assert vip.where == tr.AT_ATTENTIVE and "answer never came" in vip.detail
    assert vip.attentive_job == tr.AttentiveJob("unknown:abc", "no answer yet", 4_102_444_800_000)


def test_unknown_job_raises(pipe: Pipeline) -> None:
    with pytest.raises(JobNotFound):
        tr.trace_user(pipe.redis, "nope", "ada@x.io")


def test_entries_and_held_changes_parse() -> None:
    records = [{"attributes": {"custom": {"vip": True}}}, {"attributes": {"custom": {"lapsed": False}}}]
    entry = "|vip|lapsed|\t" + json.dumps(records)
    assert tr.parse_entry(entry.encode()) == {"vip": records[0], "lapsed": records[1]}
    held = 'vip\t{"attributes":{"custom":{"vip":false}}}\temail:a@x.io\nlapsed\t{"a":1}\n'
    assert tr.parse_waiting(held) == {"vip": {"attributes": {"custom": {"vip": False}}}, "lapsed": {"a": 1}}


# --- command line -----------------------------------------------------------------------------------
@pytest.fixture
def run_cli(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setattr(cli, "_redis", lambda settings: pipe.redis)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["trace", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_readable_and_json(pipe: Pipeline, run_cli: Any) -> None:
    job = pipe.create_job()
    pipe.ingest(enter("ada@x.io", "vip"))
    code, out, err = run_cli(job.id, "ada@x.io")
    assert code == 0 and err == ""
    assert out.startswith(f"user ada@x.io in job {job.id}")
    assert "vip\n  newest event  enter at 2026-11-26T17:00:00Z" in out
    assert "  now           in the open batch (open since " in out
    assert "lapsed\n  newest event  none accepted\n  now           no change accepted" in out

    code, out, _err = run_cli(job.id, "ada@x.io", "--json")
    data = json.loads(out)
    assert code == 0 and data["user"] == "ada@x.io" and data["job_id"] == job.id
    vip = data["audiences"][0]
    assert (vip["audience"], vip["where"], vip["event"]) == ("vip", "open", "enter")
    assert vip["last_event_ms"] == ms(AT) and vip["last_event_at"] == "2026-11-26T17:00:00Z"


def test_cli_unknown_job_is_one_error_line(run_cli: Any) -> None:
    code, out, err = run_cli("nope", "ada@x.io")
    assert code == 2 and out == ""
    assert err.startswith("error: no export job 'nope'") and err.count("\n") == 1


def test_delivery_history_is_bounded_and_searched_newest_first(fake_redis: fakeredis.FakeRedis) -> None:
    n = deliveries.HISTORY_BATCHES + 300
    pipe = fake_redis.pipeline(transaction=False)
    for bid in range(1, n + 1):
        users = [f"u{bid}-{i}@x.io" for i in range(3)] + (["ada@x.io"] if bid in (5, 400) else [])
        batch = {
            "users": json.dumps(users),
            "attentive_jobs": json.dumps([{"id": f"aj-{bid}", "idx": list(range(len(users)))}]),
            f"done:aj-{bid}": "3",
        }
        deliveries.note(pipe, "j1", bid, batch, 1_000 + bid)  # type: ignore[arg-type]
    pipe.execute()
    kept = fake_redis.xlen(keys.job_deliveries("j1"))
    assert deliveries.HISTORY_BATCHES <= kept <= deliveries.HISTORY_BATCHES + 100
    # Found past several pages; batch 5 was trimmed away, batch 400 is the newest with the user.
    assert deliveries.last_delivery(fake_redis, "j1", "ada@x.io") == deliveries.Delivery(400, 1_400, "aj-400")
    assert deliveries.last_delivery(fake_redis, "j1", f"u{n - 1}-2@x.io") == deliveries.Delivery(
        n - 1, 1_000 + n - 1, f"aj-{n - 1}"
    )
    assert deliveries.last_delivery(fake_redis, "j1", "u3-0@x.io") is None  # older than the history
    assert deliveries.last_delivery(fake_redis, "j1", "nobody@x.io") is None


def test_a_later_delivery_of_other_audiences_does_not_hide_a_dead_letter(pipe: Pipeline) -> None:
    job = pipe.create_job()
    pipe.attentive.refuse_containing("ada@x.io")
    pipe.ingest(enter("ada@x.io", "vip"))
    pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)  # refused: dead-lettered, batch 1 completes
    pipe.attentive.bulk = pipe.attentive.accept
    pipe.ingest(enter("ada@x.io", "lapsed"))
    [bid] = pipe.buffer(job).seal_now()
    flush_job(pipe.rt, job.id)
    pipe.check(job, bid)
    now = where(pipe, job.id, "ada@x.io")
    assert now["lapsed"][0] == tr.DELIVERED
    vip = now["vip"][1]
    # Batch 2 delivered the user, but it need not have carried vip: not claimed as delivered.
    assert vip.where == tr.NOT_PENDING and vip.reason and vip.reason.startswith("attentive_400")
    assert "may have carried" in vip.detail
