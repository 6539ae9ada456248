"""What the tests run against: the fake DeepSeek, the proxy harness, shared constants."""
