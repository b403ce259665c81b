"""Adapters that keep a framework's conversation history in a `WriteBehindStore`.

Each is a submodule with an optional extra of its own, imported only by those who use it
(`pip install 'writebehind[openai-agents]'`, `'writebehind[langchain]'`, ...): importing
this package imports no framework.
"""

from typing import Final

__all__ = ["FRAMEWORK_STATUSES"]

# The statuses of the sessions the adapters create (each module's `STATUS` and the ADK
# state sessions'): a chat app's listings leave them out, they are not chats.
FRAMEWORK_STATUSES: Final = frozenset(
    {"openai-agents", "langchain", "langgraph", "adk", "adk-user-state", "adk-app-state"}
)
