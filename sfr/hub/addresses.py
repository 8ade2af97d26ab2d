"""Addresses of downloads: mirrors, and addresses fit to print or record (no credentials).

A mirror serves `https://HOST/PATH` at `BASE/HOST/PATH` (the layout `wget --force-directories`
writes). User information (`user:password@`) in an address authenticates the requests but is
stripped from every address sfr prints or records.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from sfr.errors import SfrError

_USERINFO = re.compile(r"(?<=//)[^/@\s'\"]*@")


def public_address(url: str) -> str:
    """`url` without user information: `http://user:secret@host/x` becomes `http://host/x`.

    Every address sfr prints or records goes through this; requests still authenticate with the
    full address.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def scrub(text: str) -> str:
    """`text` with the user information of every address in it removed."""
    return _USERINFO.sub("", text)


def mirror_url(url: str, base_url: str) -> str:
    """`url` served by a mirror: `base_url` + `/` + the original host + the original path.

    `https://iplab.dmi.unict.it/sharing/rulstm/TSN-rgb.pth.tar` with the mirror
    `http://mirror.lan/sfr` becomes `http://mirror.lan/sfr/iplab.dmi.unict.it/sharing/rulstm/
    TSN-rgb.pth.tar`: the layout `wget --force-directories` writes, so one mirror holds files
    from several hosts without clashes. User information in `base_url` is kept for the requests
    (basic authentication) and stripped from every message and record.
    """
    try:
        base = urlsplit(base_url)
        base.port  # noqa: B018 - a malformed host or port raises here
    except ValueError:
        base = None
    if (
        base is None
        or base.scheme not in ("http", "https")
        or not base.netloc
        or base.query
        or base.fragment
    ):
        raise SfrError(
            f"Mirror address {scrub(base_url)!r} is not an http(s) URL.",
            hint="Pass --base-url (or SFR_MIRROR) like https://mirror.example.org/sfr",
        )
    original = urlsplit(url)
    path = f"{base.path.rstrip('/')}/{original.netloc}{original.path}"
    return urlunsplit((base.scheme, base.netloc, path, original.query, ""))
