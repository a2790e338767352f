"""The report `lathe verify` and `lathe trace` fill in: one named line per check (PASS, FAIL, SKIP or
INFO), the facts a package states about itself, and the tracebacks of unexpected errors."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from lathe.errors import LatheError
from lathe.io import printable
from lathe.ship.contract import Manifest

Status = Literal["PASS", "FAIL", "SKIP", "INFO"]  # INFO: shown, not checked (measured values)


@dataclass(frozen=True)
class Check:
    """One named verification line."""

    name: str
    status: Status
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "passed": self.passed, "message": self.message}


@dataclass
class VerifyReport:
    """Every check run against one package, in order, and what the package says it is."""

    subject: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # package id, target, variant, build time, key
    manifest: Manifest | None = None
    manifest_raw: dict | None = None
    debug: list[str] = field(default_factory=list)  # tracebacks of unexpected errors (shown with --debug)

    @property
    def ok(self) -> bool:
        """No check failed and the signature was verified by a trusted key (a skipped signature is not a pass)."""
        return self.status_of("signature") == "PASS" and not self.failed()

    def add(self, name: str, status: Status, message: str) -> None:
        self.checks.append(Check(name, status, message))

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def status_of(self, name: str) -> Status | None:
        return next((c.status for c in self.checks if c.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {"package": self.subject, "ok": self.ok, "facts": self.facts,
                "checks": [c.as_dict() for c in self.checks]}

    @contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Any unexpected error inside becomes one FAIL line for `name` (its traceback kept for --debug)."""
        try:
            yield
        except LatheError as exc:
            self.add(name, "FAIL", str(exc))
        except Exception as exc:  # a bug or an input no check foresaw: still one line, never a traceback
            self.debug.append(traceback.format_exc())
            self.add(name, "FAIL", f"unexpected error ({type(exc).__name__}: {printable(str(exc), 160)})")


def _short(h: str | None) -> str:
    return (h or "none")[:16]
