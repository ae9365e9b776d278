"""Model and data I/O: loading, checking, saving, and the quantized formats."""
