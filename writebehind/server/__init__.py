"""The reference chat server: writebehind wired the way a real chat app wires it.

`pip install writebehind[server]`, then `python -m writebehind.server` (or `make run`),
or `uvicorn writebehind.server:app` (the app from the environment), or your own
`create_app(...)`.
"""

from .application import ServerApp, create_app
from .settings import ServerSettings

__all__ = ["ServerApp", "ServerSettings", "app", "create_app"]

app = ServerApp()
