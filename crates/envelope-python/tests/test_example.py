"""The README's example runs: examples/python/llm_client.py against its fake model server."""

from __future__ import annotations

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[3] / "examples" / "python" / "llm_client.py"


async def test_the_llm_client_example_gets_its_answers_through_503_and_429() -> None:
    spec = importlib.util.spec_from_file_location("llm_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answers = await module.main()
    assert answers == ["an answer to hello", "an answer to retries"]
    assert module.seen == {"hello": 3, "retries": 3}, "each prompt: 503, 429 with Retry-After, then the answer"
