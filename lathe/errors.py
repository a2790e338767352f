"""Errors a user can act on. Stages print their message (no traceback) and exit non-zero."""

from __future__ import annotations

# Exit statuses of a stage (stages/common.run): a data failure (DataError, ValidationFailed) is told
# apart from any other, so orchestration never retries it and reports it as a data problem.
ERROR_EXIT = 1
DATA_ERROR_EXIT = 3


class LatheError(Exception):
    """Base class: the message must say what is wrong and where (file, sample or key)."""


class ConfigError(LatheError):
    """A params section is missing, mistyped or out of range."""


class DataError(LatheError):
    """Input data cannot be used; the message names the file(s) at fault."""


class ValidationFailed(LatheError):
    """The data gate rejected the prepared data; the message lists failed expectations."""


MAX_LISTED = 20  # problems listed in one message; the rest are counted


def problem_list(title: str, problems: list[str], limit: int = MAX_LISTED) -> str:
    """`title`, then one line per problem (the first `limit`), then "... and N more": all of them in one message."""
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return title + "".join(f"\n  {p}" for p in shown) + more
