"""``python -m proxy demo``: the whole metering path on one machine, without a DeepSeek key.

- `run`                - the command: simulated upstream, real proxy, scripted calls, report
- `simulated_deepseek` - a SIMULATED DeepSeek API (no model, no billing) used only by the demo
"""
