"""The background writer (inference/writer.py): results in the order queued, failures as
results, and a bound on unfinished jobs."""
import threading
import time

from inference.writer import OrderedWriter


def test_results_come_back_in_the_order_queued_whatever_finishes_first():
    writer = OrderedWriter(threads=3)
    out = []
    out += writer.submit("slow", time.sleep, 0.3)
    writer.put("known", "an error row")
    out += writer.submit("fast", lambda: "fast result")
    assert out == []  # the slow job holds the queue
    out += writer.close()
    assert [key for key, _, _ in out] == ["slow", "known", "fast"]
    assert out[1][1] == "an error row" and out[2][1] == "fast result"


def test_a_failing_job_is_handed_back_with_its_exception():
    def fail():
        raise OSError("disk full")

    writer = OrderedWriter()
    out = writer.submit("a", fail) + writer.submit("b", lambda: 2)
    (key_a, result_a, exc_a), (key_b, result_b, exc_b) = out + writer.close()
    assert (key_a, result_a) == ("a", None) and isinstance(exc_a, OSError) and "disk full" in str(exc_a)
    assert (key_b, result_b, exc_b) == ("b", 2, None)


def test_at_most_max_pending_jobs_wait_unfinished():
    release = threading.Event()
    writer = OrderedWriter(threads=1, max_pending=2)
    assert writer.submit(0, release.wait) == [] and writer.submit(1, lambda: 1) == []
    threading.Timer(0.2, release.set).start()
    start = time.perf_counter()
    handed_back = writer.submit(2, lambda: 2)  # a third job waits for the oldest to finish
    assert time.perf_counter() - start >= 0.15
    assert [key for key, _, _ in handed_back] == [0]
    assert [key for key, _, _ in writer.close()] == [1, 2]
