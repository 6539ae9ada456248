"""Metering proxy for the DeepSeek API.

Package map: `pricing` (price book and engine), `usage` (billable counts), `cli` (commands).
"""
