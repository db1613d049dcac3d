"""Errors that are the user's to fix: the CLI prints their message and exits with code 2.

Each kind is its own type, so that a caller (the server, mapping errors to HTTP answers)
decides by the type and its fields, never by the message text.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a path, a name, a config field); its message is one line."""


class ConfigError(UserError):
    """A config field or option that is unknown, missing, of the wrong type or out of its
    range; the message names it, and `field` holds its name where one field is at fault
    (the server reports it as the error's `param`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ContextLengthError(UserError):
    """A prompt plus the new tokens asked for do not fit the model's context.

    Attributes:
        prompt_tokens: tokens of the prompt (the longest prompt of a batch).
        new_tokens: new tokens asked for.
        context: the most tokens the model (or the server) holds, prompt and answer together.
        asked_as: the option that asked for the new tokens, as the user wrote it
            ("max_new_tokens", "max_tokens"); None when none was given and the prompt
            alone leaves no room for an answer.
    """

    def __init__(self, prompt_tokens: int, new_tokens: int, context: int,
                 asked_as: str | None = "max_new_tokens"):
        if asked_as is None:
            message = (f"the prompt ({prompt_tokens} tokens) leaves no room for an answer in the "
                       f"context of {context} tokens")
        else:
            message = (f"the prompt ({prompt_tokens} tokens) plus {asked_as} ({new_tokens}) exceeds "
                       f"the context of {context} tokens")
        super().__init__(message)
        self.prompt_tokens, self.new_tokens, self.context, self.asked_as = (
            prompt_tokens, new_tokens, context, asked_as)


def check_context_length(prompt_tokens: int, new_tokens: int, context: int,
                         asked_as: str | None = "max_new_tokens") -> None:
    """The one context-length check of chat, eval and serve.

    Raises:
        ContextLengthError: when `prompt_tokens + new_tokens > context` (with its counts).
    """
    if prompt_tokens + new_tokens > context:
        raise ContextLengthError(prompt_tokens, new_tokens, context, asked_as)
