"""OpenAI-compatible HTTP serving over the jit decoders (engine, protocol, server)."""
