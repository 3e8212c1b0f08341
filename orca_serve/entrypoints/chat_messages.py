"""Chat messages, checked once here for the OpenAI server and ``LLM.chat``.

A conversation is a non-empty list of ``{"role", "content"}`` dicts. Content
is a string, a list of ``{"type": "text", "text": ...}`` parts (joined by
newlines: chat templates want one string) or None / absent (empty: OpenAI
allows it, e.g. for an assistant message that carries tool calls). A
malformed message is a ``MessageError`` naming where it is
(``messages[1].role``), raised before a template sees it: templates fail on
such input with whatever jinja or the tokenizer raises, or render garbage.
The message shows the value sent (``got 5``), not its Python type, and
calls a message an object, as JSON and the OpenAI API do: the server's
clients never sent a ``dict`` or an ``int``.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

from orca_serve.shown import shown

OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


class MessageError(ValueError):
    """A malformed message; ``field`` is where it is (``messages[1].role``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def conversation(messages, *, roles: Collection[str] | None = None, keep_other_keys: bool = False,
                 where: str = "messages") -> list[dict]:
    """The messages as chat templates take them: role, content as text, and
    name when given. ``roles``: the roles allowed (None: any string, for
    templates with roles of their own). ``keep_other_keys`` passes the rest
    (tool_calls, tool_call_id, ...), and a null or absent content, on to the
    template as given."""
    if not isinstance(messages, (list, tuple)):
        raise MessageError(where, f"{where}: must be a list of objects with role and content, got {shown(messages)}")
    if not messages:
        raise MessageError(where, f"{where} must hold at least one message")
    return [_message(f"{where}[{i}]", m, roles, keep_other_keys) for i, m in enumerate(messages)]


def _message(path: str, msg, roles: Collection[str] | None, keep_other_keys: bool) -> dict:
    if not isinstance(msg, Mapping):
        raise MessageError(path, f"{path}: must be an object with role and content, got {shown(msg)}")
    if "role" not in msg:
        raise MessageError(f"{path}.role", f"{path}.role is missing (a string such as {shown('user')})")
    role = _text(f"{path}.role", msg["role"])
    if roles is not None and role not in roles:
        raise MessageError(f"{path}.role", f"{path}.role must be one of {', '.join(roles)}; got {shown(role)}")
    out = dict(msg) if keep_other_keys else {}
    out["role"] = role
    if msg.get("content") is not None or not keep_other_keys:
        # A null or absent content is '' for the server; templates that take
        # other keys may test for it (an assistant turn with tool calls).
        out["content"] = content_text(f"{path}.content", msg.get("content"))
    if msg.get("name") is not None:
        out["name"] = _text(f"{path}.name", msg["name"])
    return out


def content_text(path: str, content) -> str:
    """A message's content as one string ('' for None)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(path, content)
    if not isinstance(content, (list, tuple)):
        raise MessageError(path, f"{path} must be a string, a list of text parts or {shown(None)}, "
                                 f"got {shown(content)}")
    texts = []
    for i, part in enumerate(content):
        # Name the part that is wrong, and how.
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            what = f"has type {shown(kind)}" if kind is not None else 'is not an object with "type": "text"'
            raise MessageError(path, f"{path}: part {i} {what}; only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise MessageError(path, f'{path}: part {i} needs "text", a string')
        texts.append(_text(path, part["text"]))
    return "\n".join(texts)


def _text(path: str, value) -> str:
    if not isinstance(value, str):
        raise MessageError(path, f"{path} must be a string, got {shown(value)}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # no tokenizer can encode it; its own error names no message
        raise MessageError(path, f"{path}: text holds an unpaired UTF-16 surrogate at {exc.start}") from None
    return value
