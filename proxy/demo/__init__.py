"""``python -m proxy demo``: the whole metering path on one machine, without a DeepSeek key.

- `run`                - the command: simulated upstream, real proxy, scripted calls
- `script`             - the fixed script of calls and the instants they are priced at
- `report`             - what it prints: the calls, the spend from the ledger, the metrics
- `simulated_deepseek` - a SIMULATED DeepSeek API (no model, no billing) used only by the demo
"""
