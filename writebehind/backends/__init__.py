"""Backends: where the write-behind store keeps what it flushes."""
