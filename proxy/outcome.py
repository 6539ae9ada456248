"""How a call ended, decided once from the facts the relay recorded.

The relay never names an outcome while it works: it records what it saw (DeepSeek's status,
what failed, whether the client left) and `classify` turns those facts into the record's
outcome when the call is over. One pure function, so every ending is tested in one table
(tests/unit/test_outcome.py) rather than re-derived along the relay's twelve paths.
"""

from __future__ import annotations

from typing import Literal

from proxy.records import Outcome

Failure = Literal["unreachable", "timeout", "cut", "unreadable", "aborted"]
"""What ended a call early, if anything:

- ``unreachable``: no connection to DeepSeek, so nothing was sent;
- ``timeout``: DeepSeek was silent too long (before its answer or in the middle of it);
- ``cut``: the connection broke after the request went out, or the answer ended before it was
  whole (a stream without ``[DONE]``, an empty body). A bug of the proxy's own in the middle
  of a call counts as a cut too: the answer was not seen whole, so its usage is estimated;
- ``unreadable``: DeepSeek's answer cannot be read as its JSON (an unparseable body, an
  encoding the proxy cannot undo, an event without end);
- ``aborted``: the proxy itself cancelled the call (it was stopping).
"""


def classify(status: int | None, failure: Failure | None, client_left: bool) -> Outcome:
    """The outcome of a call whose answer had HTTP `status` (None: none came), which `failure`
    ended early (None: nothing did), and whose client left before the end or not.

    A client that left explains a timeout or a cut that follows (the proxy reads on only for a
    grace time, and stops there), so those count as ``client_disconnected``; an unreadable
    answer is DeepSeek's fault whoever was still listening.
    """
    if failure == "aborted":
        return "aborted"
    if failure == "unreadable":
        return "bad_response"
    if failure == "unreachable":
        return "connect_error"
    if failure is not None:
        if client_left:
            return "client_disconnected"
        return "timeout" if failure == "timeout" else "upstream_cut"
    if status is None:
        return "connect_error"  # never sent: nothing came back and nothing failed after
    if status >= 300:
        return "upstream_error"
    return "client_disconnected" if client_left else "complete"
