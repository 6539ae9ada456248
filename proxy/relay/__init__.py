"""The relay: one completion call from the client to DeepSeek and back, metered on the way.

    call.py      `proxy_completion`: read, admit, reserve, exchange, record (exactly once)
    request.py   the client's request: its id, its body read, checked, parsed and rewritten
    exchange.py  the exchange with DeepSeek and the relay of its answer; records facts only
    deadline.py  when the exchange must end (first byte, total, a departed client's grace)
    tap.py       a JSON answer kept for metering within bounded memory

How a call ended is decided from the exchange's facts by `proxy.outcome.classify`.
"""

from proxy.relay.call import Endpoint, proxy_completion

__all__ = ["Endpoint", "proxy_completion"]
