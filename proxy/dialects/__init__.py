"""The API formats DeepSeek serves besides OpenAI Chat Completions (issue 15, step 5 of 7).

One account, three formats: OpenAI Chat Completions (`proxy.usage`, `proxy.metering`), the
Anthropic Messages format at ``/anthropic`` (`proxy.dialects.anthropic`) and the OpenAI
Responses API (`proxy.dialects.responses`). A dialect is data plus a small module: how its usage
object reads as `proxy.usage.TokenUsage` (pure functions, here), how usage arrives in its stream
(an accumulator fed each event's JSON), and, still to come, its routes, the header its client
key and the company key travel in, and its error shape, plugged in at the upstream seam so that
budgets, the ledger, metrics, reprice and report treat every call alike.
"""
