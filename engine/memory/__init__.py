"""KV memory: slot allocator, request→token table, radix prefix cache."""
