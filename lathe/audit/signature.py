"""The signature check: a package's signature against each trusted key (lathe.audit.trust), naming the
key that made it. Used on the package verified and on a rebuilt one."""

from __future__ import annotations

from pathlib import Path

from lathe.audit.report import VerifyReport
from lathe.audit.trust import Trust
from lathe.io import printable


def check_signature(pkg: Path, trust: Trust, report: VerifyReport, name: str = "signature",
                    fact: str | None = "signed by") -> None:
    """The signature against each trusted key (the one the signature names first); names the key that made it
    (and records it as the report's `fact`, when given)."""
    from lathe.ship.signing import SignatureError, read_signature, signature_key_hint, verify_signature

    with report.guard(name):
        if not trust.keys:
            report.add(name, "SKIP", f"not checked: no trusted key ({'; '.join(trust.problems) or trust.source})")
            return
        hint = signature_key_hint(read_signature(pkg))
        keys = sorted(trust.keys, key=lambda k: k.fingerprint != hint)
        errors = []
        for key in keys:
            try:
                verify_signature(pkg, key.path)
            except SignatureError as exc:
                errors.append((key, str(exc)))
                continue
            if fact:
                report.facts[fact] = f"{key.short} ({trust.source})"
            report.add(name, "PASS", f"valid, made by key {key.short} from {printable(trust.source)} "
                                     f"({printable(key.shown)}); covers every file")
            return
        named = trust.by_fingerprint(hint)
        if named is not None:  # the signer is trusted, so its verdict on the files is the one that matters
            report.add(name, "FAIL", f"key {named.short}: {next(msg for k, msg in errors if k is named)}")
            return
        trusted = ", ".join(k.short for k in trust.keys)
        report.add(name, "FAIL", f"made by key {('sha256:' + hint[:16]) if hint else '(unnamed)'}, which is not "
                                 f"trusted (trusted: {trusted} from {printable(trust.source)})")
