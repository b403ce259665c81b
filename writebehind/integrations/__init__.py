"""Adapters that keep a framework's conversation history in a `WriteBehindStore`.

Each is a submodule with an optional extra of its own, imported only by those who use it
(`pip install 'writebehind[openai-agents]'`, `'writebehind[langchain]'`, ...): importing
this package imports no framework.
"""
