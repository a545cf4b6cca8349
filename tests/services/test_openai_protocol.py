"""Parsing OpenAI request bodies: accepted shapes, and a 400 naming the field otherwise."""
from __future__ import annotations

import pytest

from pdserve.router.errors import RequestError
from pdserve.router.openai_protocol import parse_chat, parse_completion
from pdserve.router.request_types import Delta, TokenLogprob, TopToken, Usage
from pdserve.router.openai_responses import ResponseBuilder


def test_completion_fields_map_to_sampling_values() -> None:
    req = parse_completion({"model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0, "top_k": 5,
                            "stop": ["\n"], "seed": 3, "logprobs": 2, "stream": True,
                            "stream_options": {"include_usage": True}, "user": "u", "n": 1, "echo": False})
    assert req.prompt.text == "hi" and req.stream and req.include_usage
    assert req.values == {"max_tokens": 7, "temperature": 0, "top_k": 5, "stop": ["\n"], "seed": 3, "logprobs": 2}
    assert req.default_max_tokens == 16


def test_completion_token_prompt_and_batch_of_one() -> None:
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt.token_ids == [1, 2, 3]
    assert parse_completion({"model": "m", "prompt": ["x"]}).prompt.text == "x"


def test_chat_messages_and_logprobs() -> None:
    req = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                                 {"role": "user", "content": "b"}],
                      "max_completion_tokens": 9, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert req.prompt.messages == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert req.values["max_tokens"] == 9 and req.values["logprobs"] == 2 and req.default_max_tokens is None


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": ""}, None),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": "x", "n": 2}, "n"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
    ({"model": "m", "prompt": "x", "stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "x", "ignore_eos": 1}, "ignore_eos"),
])
def test_completion_rejects(body: object, param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_completion(body)
    assert info.value.status == 400
    if param:
        assert info.value.param == param, info.value.message
        assert param in info.value.message


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
])
def test_chat_rejects(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat(body)
    assert info.value.param == param, info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_response_shapes() -> None:
    lp = [TokenLogprob(5, "a", -0.1, [TopToken(5, "a", -0.1), TopToken(6, "b", -2.0)])]
    final = Delta(text="a", token_ids=[5], logprobs=lp, finish_reason="stop", usage=Usage(3, 1, 2))
    chat = ResponseBuilder("chat", "id", "m", 0, True).full(final)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "a"}
    assert chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"] == "b"
    assert chat["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    cmpl = ResponseBuilder("completion", "id", "m", 0, True).full(final)
    assert cmpl["choices"][0]["logprobs"] == {"tokens": ["a"], "token_logprobs": [-0.1],
                                              "top_logprobs": [{"a": -0.1, "b": -2.0}], "text_offset": [0]}
