"""How error messages show a value a user gave (orca_serve/shown.py)."""
import asyncio

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
