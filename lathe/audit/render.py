"""Terminal views of verify and trace: one screen, answer first, nothing from a package read as markup.

Every string that comes from a package is passed through `lathe.io.printable` (control characters
escaped) and printed as plain `Text`, so neither escape sequences nor rich markup in a manifest
reach the terminal. Hash columns never wrap.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lathe.io import printable

STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow", "INFO": "cyan", "VERIFIED": "bold green", "MISMATCH": "bold red",
         "UNVERIFIED": "bold yellow", "UNKNOWN": "bold yellow", "OK": "bold green"}


def plain(value: Any, style: str = "") -> Text:
    return Text(printable(str(value), 400), style=style)


def _facts_line(facts: dict[str, str]) -> Text:
    line = Text()
    for i, (k, v) in enumerate(facts.items()):
        line.append("  " if i else "")
        line.append(f"{k} ", style="bold")
        line.append(printable(v, 200))
    return line


def render_verify(report, console: Console) -> None:
    """Facts (id, target, variant, build time, key) first, then one line per check, then the verdict."""
    console.print(Text("verify ", style="bold") + plain(report.subject))
    if report.facts:
        console.print(_facts_line(report.facts))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail")
    for c in report.checks:
        table.add_row(plain(c.name), Text(c.status, style=STYLE[c.status]), plain(c.message))
    console.print(table)
    failed = report.failed()
    skipped = [c.name for c in report.checks if c.status == "SKIP"]
    if report.ok:
        extra = f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else ""
        console.print(Text(f"ALL CHECKS PASSED{extra}", style="bold green"))
    else:
        why = f"{len(failed)} CHECK(S) FAILED" if failed else "NOT VERIFIED (signature not checked)"
        console.print(Text(why + (": " + ", ".join(c.name for c in failed) if failed else ""), style="bold red"))


def render_trace(result: dict[str, Any], console: Console, params: bool = False) -> None:
    """The answer on one screen: verdict, data, validation, commit, target, metrics; then the chain of hashes."""
    verdict = result["verdict"]
    head = Text(verdict, style=STYLE[verdict]) + Text(
        f" — package {result.get('package_id')} ({result.get('target')}, {result.get('variant')})")
    signer = (result.get("facts") or {}).get("signed by")
    head.append(f", signed by {signer}" if signer else "")
    console.print(head)
    cc = result.get("cross_check")
    if cc:
        console.print(Text("repository cross-check: ", style="bold") + Text(cc["status"], style=STYLE[cc["status"]]))
        for f in cc.get("findings", []):
            console.print(plain(f"  {f}", "red" if f.startswith("MISMATCH") else ""))
    else:
        console.print(Text("repository cross-check: not run (not inside a git repository; pass --repo)"))
    for c in result.get("checks", []):
        if c["status"] != "PASS":
            console.print(Text(f"  {c['status']} ", style=STYLE[c["status"]]) + plain(f"{c['name']}: {c['message']}"))
    for s in result.get("skipped") or []:
        console.print(plain(f"  skipped while searching: {s}", "yellow"))

    raw, val, git, build = (result.get(k) or {} for k in ("raw_data", "validation", "git", "build"))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    t.add_row("found by", plain(f"{result['found_by']}: {result['source']}"))
    t.add_row("raw data", plain(f"{raw.get('path')} md5 {raw.get('md5')}, {raw.get('files')} files, "
                                f"{raw.get('samples')} samples"))
    counts = raw.get("class_counts") or {}
    t.add_row("classes", plain(", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))))
    t.add_row("validation", plain(f"{'passed' if val.get('success') else 'FAILED'}: {val.get('summary')} "
                                  f"(result sha256 {str(val.get('sha256'))[:16]}...)"))
    t.add_row("commit", plain(f"{git.get('commit')}{' (dirty tree)' if git.get('dirty') else ''}"))
    t.add_row("build", plain(f"{build.get('time')}, flow run {build.get('flow_run_id')}"))
    t.add_row("metrics", plain(_operating_point(result.get("metrics") or {})))
    console.print(t)

    c = Table(title="chain of stage hashes, raw data -> shipped file", title_justify="left", box=None,
              show_header=False, pad_edge=False)
    c.add_column("step", style="bold", no_wrap=True)
    c.add_column("output", no_wrap=True)
    c.add_column("hash", no_wrap=True)
    for row in result.get("chain") or []:
        outs = row.get("outs") or [{"path": row.get("note", ""), "md5": ""}]
        for i, o in enumerate(outs):
            h = o.get("md5") or o.get("sha256") or ""
            c.add_row(plain(row["step"] if i == 0 else ""), plain(o.get("path")),
                      plain(f"{'sha256' if o.get('sha256') else 'md5'} {h}"))
    console.print(c)
    if params:
        for section, values in sorted((result.get("params") or {}).items()):
            console.print(Text(f"params.{section} ", style="bold") + plain(
                json.dumps(values, sort_keys=True, separators=(",", ":"))))
    else:
        console.print(Text("(params: --params, or --json for everything)", style="dim"))


def _operating_point(metrics: dict) -> str:
    """Test accuracy and, at the package's threshold, defective recall and false-reject rate on test."""
    test, th = metrics.get("test") or {}, metrics.get("threshold") or {}
    at = th.get("test") or {}
    parts = [f"test accuracy {test.get('accuracy', '?')}"]
    if th:
        parts.append(f"at threshold {th.get('value')} (chosen on {th.get('chosen_on')}): defective recall "
                     f"{at.get('defective_recall', '?')}, false-reject rate {at.get('false_reject_rate', '?')}")
    return "; ".join(parts)
