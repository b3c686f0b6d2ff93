"""Executors and resume-safe runs (netanatomy.parallel)."""

from __future__ import annotations

import json

import pytest

from netanatomy.parallel import (
    LocalExecutor,
    SerialExecutor,
    WorkItem,
    WorkOutput,
    done_path,
    get_executor,
    is_done,
    run_resumable,
)
from netanatomy.errors import UserError


def square(x):
    """Module-level, so a spawned worker can unpickle it."""
    if x == 13:
        raise ValueError("unlucky")
    return WorkOutput(record={"x": x, "y": x * x}, files={f"out/{x}.txt": str(x * x).encode()})


CALLS: list = []


def counting(x):
    CALLS.append(x)
    return {"x": x}


def items(n):
    return [WorkItem(f"item-{i:03d}", i) for i in range(n)]


def test_run_writes_files_and_done_records(tmp_path):
    s = run_resumable(square, items(4), tmp_path, SerialExecutor())
    assert s.ok and sorted(s.ran) == [f"item-{i:03d}" for i in range(4)] and s.skipped == []
    assert s.records["item-002"] == {"x": 2, "y": 4}
    assert (tmp_path / "out" / "3.txt").read_text() == "9"
    doc = json.loads(done_path(tmp_path, "item-001").read_text())
    assert doc["complete"] is True and doc["files"]["out/1.txt"]["size"] == 1
    # no temp files left behind
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_rerun_skips_finished_items(tmp_path):
    CALLS.clear()
    first = run_resumable(counting, items(5), tmp_path, SerialExecutor())
    assert len(CALLS) == 5
    CALLS.clear()
    again = run_resumable(counting, items(5), tmp_path, SerialExecutor())
    assert CALLS == [] and again.ran == [] and len(again.skipped) == 5
    assert again.records == first.records
    # one more item: only that one runs
    more = run_resumable(counting, items(6), tmp_path, SerialExecutor())
    assert CALLS == [5] and more.ran == ["item-005"]


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "no_complete_mark", "other_key", "file_missing", "file_truncated"],
)
def test_partial_or_corrupt_results_are_not_finished(tmp_path, damage):
    run_resumable(square, items(3), tmp_path, SerialExecutor())
    p = done_path(tmp_path, "item-001")
    text = p.read_text()
    if damage == "garbage":
        p.write_bytes(b"\x00\x01not json")
    elif damage == "truncated":
        p.write_text(text[: len(text) // 2])
    elif damage == "no_complete_mark":
        doc = json.loads(text)
        doc.pop("complete")
        p.write_text(json.dumps(doc))
    elif damage == "other_key":
        doc = json.loads(text)
        doc["key"] = "item-002"
        p.write_text(json.dumps(doc))
    elif damage == "file_missing":
        (tmp_path / "out" / "1.txt").unlink()
    elif damage == "file_truncated":
        (tmp_path / "out" / "1.txt").write_text("")
    assert not is_done(tmp_path, "item-001")
    assert is_done(tmp_path, "item-000") and is_done(tmp_path, "item-002")
    s = run_resumable(square, items(3), tmp_path, SerialExecutor())
    assert s.ran == ["item-001"] and sorted(s.skipped) == ["item-000", "item-002"]
    assert (tmp_path / "out" / "1.txt").read_text() == "1"
    assert is_done(tmp_path, "item-001")


def test_failure_is_isolated_and_retried(tmp_path):
    its = [WorkItem("a", 2), WorkItem("b", 13), WorkItem("c", 3)]
    s = run_resumable(square, its, tmp_path, SerialExecutor())
    assert not s.ok and [f.key for f in s.failures] == ["b"] and "unlucky" in s.failures[0].error
    assert sorted(s.ran) == ["a", "c"] and not is_done(tmp_path, "b")
    s2 = run_resumable(square, its, tmp_path, SerialExecutor())
    assert s2.ran == [] and [f.key for f in s2.failures] == ["b"]


def test_bad_keys_and_outputs_are_refused(tmp_path):
    with pytest.raises(ValueError):
        run_resumable(square, [WorkItem("../evil", 1)], tmp_path, SerialExecutor())
    with pytest.raises(ValueError):
        run_resumable(square, [WorkItem("a", 1), WorkItem("a", 2)], tmp_path, SerialExecutor())

    def escape(x):
        return WorkOutput({"x": x}, {"../outside.txt": b"x"})

    with pytest.raises(ValueError):
        run_resumable(escape, [WorkItem("a", 1)], tmp_path / "inner", SerialExecutor())
    assert not (tmp_path / "outside.txt").exists()


def test_local_pool_matches_serial(tmp_path):
    its = items(6)
    serial = run_resumable(square, its, tmp_path / "s", SerialExecutor())
    # fork: the workers need nothing but this module (spawn is the default and is
    # exercised by the zoo CLI; here it would only add interpreter start-up time)
    with LocalExecutor(2, threads=None, start_method="fork") as ex:
        pooled = run_resumable(square, its, tmp_path / "p", ex)
    assert pooled.records == serial.records
    assert (tmp_path / "p" / "out" / "5.txt").read_text() == "25"


def test_executor_map_keeps_order():
    assert SerialExecutor().map(abs, [-3, 2, -1]) == [3, 2, 1]
    with pytest.raises(RuntimeError):
        SerialExecutor().map(square, [13])


def test_get_executor_choices():
    assert isinstance(get_executor(None, 0), SerialExecutor)
    ex = get_executor(None, 3)
    assert isinstance(ex, LocalExecutor) and ex.workers == 3
    with pytest.raises(UserError):
        get_executor(None, -1)


def test_time_limit_keeps_finished_items_and_resumes(tmp_path):
    CALLS.clear()
    s = run_resumable(counting, items(4), tmp_path, SerialExecutor(), time_limit=0.0)
    assert s.ran == ["item-000"] and s.unfinished == ["item-001", "item-002", "item-003"]
    s2 = run_resumable(counting, items(4), tmp_path, SerialExecutor())
    assert sorted(s2.ran) == ["item-001", "item-002", "item-003"] and s2.skipped == ["item-000"]
    assert CALLS == [0, 1, 2, 3]


def test_time_limit_on_a_pool_cancels_only_unstarted_items(tmp_path):
    with LocalExecutor(2, threads=None, start_method="fork") as ex:
        s = run_resumable(square, items(12), tmp_path, ex, time_limit=0.0)
    assert s.ran and not s.failures
    assert set(s.ran) | set(s.unfinished) == {f"item-{i:03d}" for i in range(12)}
    for k in s.ran:  # whatever ran is finished and intact
        assert is_done(tmp_path, k)


def test_time_limit_on_a_pool_starts_nothing_after_the_stop(tmp_path):
    # one item per worker in flight: once the limit is seen, no queued item starts
    with LocalExecutor(2, threads=None, start_method="fork") as ex:
        s = run_resumable(square, items(12), tmp_path, ex, time_limit=0.0)
    assert 1 <= len(s.ran) <= 2 and len(s.unfinished) >= 10


def test_pool_runs_every_item_with_a_bounded_window(tmp_path):
    with LocalExecutor(2, threads=None, start_method="fork") as ex:
        s = run_resumable(square, items(9), tmp_path, ex)
    assert sorted(s.ran) == [f"item-{i:03d}" for i in range(9)] and not s.unfinished
    assert [s.records[f"item-{i:03d}"]["y"] for i in range(9)] == [i * i for i in range(9)]
