"""The OpenAPI 3.1 document of the router's HTTP API (``GET /openapi.json``).

Owns a hand-written description of every route, with request schemas that match
what ``openai_protocol`` and ``validation`` accept: the same fields, types and
numeric bounds (taken from ``validation``, so they cannot drift), the router's
own max_tokens cap and body size limit, and the API key when one is set. A value
the schema allows may still get a 400 that only the cluster can decide (a model
not served, token ids outside the vocabulary, a prompt over the context length,
stream_options without stream).
"""
from __future__ import annotations

from typing import Any

from pdserve.router.prepare import MaxTokensPolicy
from pdserve.router.validation import (FLOAT32_TINY, FLOAT_BOUNDS, INT_BOUNDS, MAX_LOGPROBS, MAX_STOP_STRINGS, ROLES,
                                       TOKEN_ID, Bound)

JSON = "application/json"


def openapi_document(policy: MaxTokensPolicy, max_body_bytes: int, api_key: bool, metrics_need_key: bool,
                     models: list[str] | None = None) -> dict[str, Any]:
    """The document for one router's settings; ``models``: the served models, when known."""
    schemas = {"Error": _ERROR, "CompletionRequest": _completion_request(policy, models),
               "ChatCompletionRequest": _chat_request(policy, models), **_ADAPTER_REQUESTS}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "pdserve router", "version": "1",
                 "description": "OpenAI-compatible API of a pdserve cluster. Request bodies larger than "
                                f"{max_body_bytes} bytes get 413. Every error body is OpenAI's error object."},
        "paths": _paths(api_key, metrics_need_key),
        "components": {"schemas": schemas},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _paths(api_key: bool, metrics_need_key: bool) -> dict[str, Any]:
    secured = [{"bearer": []}] if api_key else []
    return {
        "/v1/completions": {"post": _generate("Text completion", "CompletionRequest", secured)},
        "/v1/chat/completions": {"post": _generate("Chat completion", "ChatCompletionRequest", secured)},
        "/v1/models": {"get": _get("The models the live workers serve", JSON, secured)},
        "/workers": {"get": _get("Live workers, their load and KV compatibility", JSON, secured)},
        "/health": {"get": _get("Readiness: 200, or 503 naming each problem", JSON, [], extra={"503": _JSON_OK})},
        "/metrics": {"get": _get("Prometheus metrics", "text/plain", secured if metrics_need_key else [])},
        "/v1/load_lora_adapter": {"post": _adapter_call("Load a LoRA adapter (a PEFT directory on the workers) on "
                                                        "every worker of the model", "LoadLoraAdapterRequest",
                                                        secured)},
        "/v1/unload_lora_adapter": {"post": _adapter_call("Unload a LoRA adapter everywhere; requests in flight "
                                                          "finish with it", "UnloadLoraAdapterRequest", secured)},
    }


def _adapter_call(summary: str, schema: str, secured: list) -> dict[str, Any]:
    ok = {"description": "Each worker's result", "content": {JSON: {"schema": {"type": "object"}}}}
    return {"summary": summary, "security": secured,
            "requestBody": {"required": True,
                            "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {"200": ok, **_errors("400", "401", "404", "413", "503")}}


_NAME = {"type": "string", "minLength": 1}
_ADAPTER_REQUESTS = {
    "LoadLoraAdapterRequest": {"type": "object", "required": ["lora_name", "lora_path"], "additionalProperties": False,
                               "properties": {"lora_name": _NAME, "lora_path": _NAME, "model": _NAME}},
    "UnloadLoraAdapterRequest": {"type": "object", "required": ["lora_name"], "additionalProperties": False,
                                 "properties": {"lora_name": _NAME, "lora_path": {"type": "string"},
                                                "lora_int_id": {"type": "integer"}}},
}


_JSON_OK = {"description": "JSON", "content": {JSON: {"schema": {"type": "object"}}}}
# Fields that need another: stream_options with anything in it needs stream=true (both APIs), top_logprobs
# needs logprobs=true (chat).
_NEEDS_STREAM = {"stream_options": {"anyOf": [{"properties": {"stream_options": {"maxProperties": 0}}},
                                              {"required": ["stream"], "properties": {"stream": {"const": True}}}]}}
_NEEDS_LOGPROBS = {"top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}


def _errors(*codes: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Error"}
    return {code: {"description": "error", "content": {JSON: {"schema": ref}}} for code in codes}


def _get(summary: str, media: str, secured: list, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses = {"200": {"description": "OK", "content": {media: {"schema": {} if media != JSON else
                                                                   {"type": ["object", "array"]}}}}}
    responses.update(extra or {})
    if secured:
        responses.update(_errors("401"))
    return {"summary": summary, "security": secured, "responses": responses}


def _generate(summary: str, schema: str, secured: list) -> dict[str, Any]:
    ok = {"description": "The completion (JSON), or with stream=true server-sent events ending in [DONE]",
          "content": {JSON: {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}}
    return {"summary": summary, "security": secured,
            "requestBody": {"required": True,
                            "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {"200": ok, **_errors("400", "401", "413", "503")}}


_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def _int(bound: Bound, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": int(bound.low), "maximum": int(bound.high), **extra}


def _float(bound: Bound) -> dict[str, Any]:
    """(0, x] is [smallest float32, x]: anything smaller is 0 on the wire, which the router refuses."""
    if bound.low_open and bound.low != 0:
        low = {"exclusiveMinimum": bound.low}
    else:
        low = {"minimum": FLOAT32_TINY if bound.low_open else bound.low}
    return {"type": "number", **low, "maximum": bound.high, "description": f"in {bound}"}


def _max_tokens(policy: MaxTokensPolicy) -> dict[str, Any]:
    bound = INT_BOUNDS["max_tokens"]
    high = policy.cap or int(bound.high)
    return {"type": "integer", "minimum": int(bound.low), "maximum": high,
            "description": "at most the context length minus the prompt"}


def _sampling(policy: MaxTokensPolicy, models: list[str] | None) -> dict[str, Any]:
    model: dict[str, Any] = {"type": "string", "minLength": 1}
    if models:
        model["enum"] = list(models)
    stop_string = {"type": "string", "minLength": 1}
    return {
        "model": model,
        "max_tokens": _max_tokens(policy),
        **{name: _float(bound) for name, bound in FLOAT_BOUNDS.items()},
        "top_k": _int(INT_BOUNDS["top_k"], **{"not": {"const": 0}, "description": "-1 = disabled"}),
        "seed": _int(INT_BOUNDS["seed"]),
        "stop": {"anyOf": [stop_string, {"type": "array", "items": stop_string, "maxItems": MAX_STOP_STRINGS}]},
        "stop_token_ids": {"type": "array", "items": _int(INT_BOUNDS["stop_token_ids"])},
        "ignore_eos": {"type": "boolean"},
        "min_tokens": _int(INT_BOUNDS["min_tokens"], description="at most max_tokens"),
        "include_stop_str_in_output": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "additionalProperties": False, "description": "only with stream=true",
                           "properties": {"include_usage": {"type": "boolean"},
                                          "continuous_usage_stats": {"type": "boolean"}}},
        "user": {"type": "string"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "service_tier": {"type": "string"},
        # Defined by OpenAI, not implemented: accepted only at the value that means "off".
        "n": {"const": 1}, "store": {"const": False}, "logit_bias": {"type": "object", "maxProperties": 0},
    }


def _completion_request(policy: MaxTokensPolicy, models: list[str] | None) -> dict[str, Any]:
    ids = {"type": "array", "minItems": 1, "items": _int(TOKEN_ID), "description": "token ids of the vocabulary"}
    text = {"type": "string", "minLength": 1}
    prompt = {"anyOf": [text, ids, {"type": "array", "minItems": 1, "maxItems": 1, "items": {"anyOf": [text, ids]},
                                    "description": "a batch of one prompt"}]}
    return {"type": "object", "required": ["model", "prompt"], "additionalProperties": False,
            "dependentSchemas": _NEEDS_STREAM,
            "properties": {**_sampling(policy, models), "prompt": prompt,
                           "logprobs": _int(INT_BOUNDS["logprobs"]), "echo": {"const": False},
                           "best_of": {"const": 1}, "suffix": {"const": ""}}}


def _chat_request(policy: MaxTokensPolicy, models: list[str] | None) -> dict[str, Any]:
    part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"enum": list(ROLES)}, "name": {"type": "string"},
                              "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}}}
    off = {"tools": {"type": "array", "maxItems": 0}, "tool_choice": {"const": "none"},
           "parallel_tool_calls": {"type": "boolean"}, "functions": {"type": "array", "maxItems": 0},
           "function_call": {"const": "none"}, "response_format": {"const": {"type": "text"}},
           "modalities": {"const": ["text"]}}
    return {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
            "dependentSchemas": {**_NEEDS_STREAM, **_NEEDS_LOGPROBS},
            "properties": {**_sampling(policy, models), **off,
                           "messages": {"type": "array", "minItems": 1, "items": message},
                           "max_completion_tokens": _max_tokens(policy),
                           "logprobs": {"type": "boolean"},
                           "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                            "description": "requires logprobs=true"}}}
