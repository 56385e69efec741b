"""What a node knows of the ready queue between reads (worker.ready_view)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from queue_service.db.attempts import Queued
from queue_service.db.events import StatusChange, queue_entry
from queue_service.observability.fanout import EventHub, StreamFilter
from queue_service.worker.ready_view import ReadyView

AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def row(job_id: str, sort_key: float = 1.0) -> Queued:
    return Queued(job_id, "work", "normal", 0, sort_key, 1, 64, 30.0, AT)


def ready(job_id: str, sort_key: float = 1.0, *, entry: bool = True) -> dict[str, Any]:
    """The announcement a submission makes of a job it queued."""
    queued = queue_entry(sort_key, 1, 64, 30.0, 0) if entry else None
    return StatusChange(job_id, "work", "normal", "ready", None, 0, AT, queued).payload()


def left(job_id: str, status: str = "running") -> dict[str, Any]:
    return StatusChange(job_id, "work", "normal", status, "ready", 1, AT).payload()


def known(view: ReadyView) -> set[str] | None:
    return None if view.ready is None else set(view.ready)


def whole_read(view: ReadyView, window: list[Queued], started: tuple[str, ...] = ()) -> None:
    view.reading()
    view.read(window, True, started)


def test_nothing_is_known_until_a_read_reaches_the_end_of_the_queue() -> None:
    view = ReadyView(limit=16)
    view.announced(ready("a"))
    assert known(view) is None
    view.reading()
    view.read([row("a"), row("b")], False, ())  # the queue goes on past what was read
    assert known(view) is None
    whole_read(view, [row("a"), row("b")], started=("a",))
    assert known(view) == {"b"}


def test_announcements_keep_the_view_whole_after_a_read() -> None:
    view = ReadyView(limit=16)
    whole_read(view, [])
    view.announced(ready("a", 5.0))
    view.announced(ready("b", 2.0))
    view.announced(left("a"))  # another node started it
    view.announced(left("b", "cancelled"))
    view.announced(ready("c"))
    assert known(view) == {"c"}
    assert view.ready is not None
    assert view.ready["c"] == Queued("c", "work", "normal", 0, 1.0, 1, 64, 30.0, AT)


def test_what_is_announced_during_a_read_is_applied_over_its_window() -> None:
    view = ReadyView(limit=16)
    view.reading()
    view.announced(ready("late"))  # committed after the read's snapshot: not in the window
    view.announced(left("taken"))  # in the window, then started by another node
    view.announced(ready("mine"))  # in the window, and started by this claim
    view.read([row("taken"), row("mine"), row("other")], True, ("mine",))
    assert known(view) == {"late", "other"}


def test_a_ready_job_announced_without_its_entry_makes_the_view_unknown() -> None:
    view = ReadyView(limit=16)
    whole_read(view, [row("a")])
    view.announced(ready("b", entry=False))  # e.g. a dependant its parent's completion released
    assert known(view) is None
    view.reading()
    view.announced(ready("c", entry=False))
    view.read([], True, ())
    assert known(view) is None


def test_a_wake_during_a_read_leaves_the_view_unknown() -> None:
    """A wake-up says something changed without saying what; committed during the read,
    the read's snapshot may predate it."""
    view = ReadyView(limit=16)
    view.reading()
    view.forget()
    view.read([], True, ())
    assert known(view) is None
    whole_read(view, [])  # the next read, undisturbed, knows again
    assert known(view) == set()


def test_more_ready_jobs_than_a_window_are_left_to_reads() -> None:
    view = ReadyView(limit=2)
    whole_read(view, [row("a"), row("b")])
    assert known(view) == {"a", "b"}
    view.announced(ready("c"))
    assert known(view) is None
    whole_read(view, [row("a"), row("b"), row("c")])
    assert known(view) is None


def test_a_start_that_missed_a_planned_job_forgets_and_a_failed_read_too() -> None:
    view = ReadyView(limit=16)
    whole_read(view, [row("a"), row("b"), row("c")])
    assert view.started(["a"], ["a"])
    assert known(view) == {"b", "c"}
    assert not view.started(["b", "c"], ["b"])  # c was taken meanwhile, or dispatch paused
    assert known(view) is None
    whole_read(view, [row("d")])
    view.reading()
    view.read_failed()
    assert known(view) is None
    view.announced(ready("e"))
    assert known(view) is None


def test_the_websocket_stream_does_not_carry_the_queue_entry() -> None:
    class Listener:
        def subscribe(self, _subscriber: Any) -> Any:
            return lambda: None

    hub = EventHub(Listener(), buffer=8)  # type: ignore[arg-type]
    with hub.connect(StreamFilter.parse([], [], [])) as client:
        hub.publish(ready("a"))
        frame = client.queue.get_nowait()
    assert frame is not None
    assert '"queue"' not in frame
    assert '"job_id":"a"' in frame
