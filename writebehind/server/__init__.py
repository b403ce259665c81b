"""The reference chat server: writebehind wired the way a real chat app wires it.

`pip install writebehind[server]`, then `python -m writebehind.server` (or `make run`).
"""

from .app import create_app

__all__ = ["create_app"]
