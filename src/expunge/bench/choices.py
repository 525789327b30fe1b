"""Choosing some of a benchmark's tasks or methods by name (`expunge bench NAME --tasks ... / --methods ...`)."""
from __future__ import annotations

from ..errors import ExpungeError


def chosen(given, known, option: str, noun: str, bench: str, shown=None, note: str = "") -> tuple[str, ...]:
    """All of `known` (given None), or the names given (a list, or one comma-separated string) in `known`'s order.
    A name not in `known`, or no name at all, is an error that names the option and the choices (`shown`, default
    `known`; `note` adds why some are not choices)."""
    if given is None:
        return tuple(known)
    names = [n.strip() for n in (given.split(",") if isinstance(given, str) else given) if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        problem = f"unknown {noun} {unknown}" if unknown else f"no {noun} named"
        raise ExpungeError(f"{option}: {problem} for bench {bench}; choose among {', '.join(shown or known)}"
                           + (f" ({note})" if note else ""))
    return tuple(n for n in known if n in names)
