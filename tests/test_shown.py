"""How error messages show a value a user gave (orca_serve/shown.py)."""
import asyncio

import pytest

from orca_serve.shown import json_values, shown

VALUE = {"role": None, "ok": True, "text": "it's"}


def test_values_are_python_s_outside_json_values_and_json_s_inside():
    # reprlib's: keys sorted.
    assert shown(VALUE) == "{'ok': True, 'role': None, 'text': \"it's\"}"
    with json_values():
        assert shown(VALUE) == '{"ok": true, "role": null, "text": "it\'s"}'
        assert shown(False) == "false" and shown('say "hi"') == '"say \\"hi\\""'
        long = shown("ab" * 300)
        assert long.startswith('"abab') and long.endswith('abab" (a string of 600 characters)') and len(long) < 240
        assert shown(-10 ** 5000) == "a negative integer of 5001 digits"
    assert shown(None) == "None"


def test_json_values_holds_for_its_own_asyncio_task_only():
    """The server's handlers run concurrently on one loop: one request's
    setting must not reach another's messages."""
    async def main():
        inside, outside = asyncio.Event(), asyncio.Event()

        async def handler():
            with json_values():
                inside.set()
                await outside.wait()
                return shown(None)

        async def other():
            await inside.wait()
            try:
                return shown(None)
            finally:
                outside.set()

        return await asyncio.gather(handler(), other())

    assert asyncio.run(main()) == ["null", "None"]


def test_a_non_finite_number_is_shown_as_the_client_wrote_it():
    """Python's json reads NaN and Infinity (the server's body decoder too), so
    a request can hold them where no model field refuses them first."""
    from orca_serve.entrypoints.openai.body import decode_json
    from orca_serve.entrypoints.openai.protocol import ApiError, ChatCompletionRequest, parse_request

    with json_values():
        assert shown([float("nan"), float("inf"), -float("inf"), 1.5]) == "[NaN, Infinity, -Infinity, 1.5]"
        body = decode_json(b'{"messages": [{"role": "user", "content": NaN}]}')
        with pytest.raises(ApiError, match=r"messages\[0\]\.content must be .*, got NaN$"):
            parse_request(ChatCompletionRequest, body)
    assert shown(float("nan")) == "nan"


def test_a_server_message_quotes_json_words_as_json_does():
    """A message that names a JSON value to send writes it as the values it
    shows are written: one style in one answer."""
    from orca_serve.entrypoints.openai.protocol import ApiError, ChatCompletionRequest, parse_request

    def message(body: dict) -> str:
        with json_values(), pytest.raises(ApiError) as caught:
            parse_request(ChatCompletionRequest, body)
        return caught.value.message

    assert message({"messages": [{"content": "hi"}]}) == 'messages[0].role is missing (a string such as "user")'
    assert message({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}) \
        == 'response_format: only response_format type "text" is supported'
