"""Errors a request can meet, in OpenAI's vocabulary; raised in the worker, shown by the gateway.

They travel through Ray as plain values (see `as_dict`/`from_dict`), never matched by message.
"""

from __future__ import annotations


class RequestError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s  # for a 503: when to try again (default: a couple of seconds)

    def as_dict(self) -> dict:
        return {"message": self.message, "status": self.status, "type": self.type, "param": self.param, "code": self.code}

    @classmethod
    def from_dict(cls, data: dict) -> "RequestError":
        return cls(data["message"], data["status"], data["type"], data.get("param"), data.get("code"))


def context_length_exceeded(
    prompt_tokens: int, max_tokens: int | None, n_ctx: int, param: str = "messages"
) -> RequestError:
    wanted = prompt_tokens + (max_tokens or 0)
    detail = f"{prompt_tokens} in the messages" + (f" + {max_tokens} in the completion" if max_tokens else "")
    return RequestError(
        f"This model's maximum context length is {n_ctx} tokens. However, you requested {wanted} tokens ({detail}). "
        "Please reduce the length of the messages or completion.",
        status=400,
        param=param,
        code="context_length_exceeded",
    )
