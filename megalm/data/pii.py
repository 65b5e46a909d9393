"""Personal data redaction: e-mail addresses, IP addresses, phone numbers, Chinese resident ID
and mobile numbers, each replaced by a placeholder and counted.

Placeholders follow datatrove's PII formatter: e-mails become ``email@example.com`` or
``firstname.lastname@example.org`` (domains kept for examples), IP addresses one of datatrove's six
randomly chosen IPv4 addresses that did not answer pings. Which one is picked depends only on the
matched text (a CRC), not on a counter, so every worker and every engine writes the same output.
Phone numbers become ``555-0100`` (the fictional North American range), Chinese mobile numbers
``13000000000`` and resident IDs ``000000000000000000``.

Matches are validated so that ordinary numbers survive: an IP must parse and be public (private,
loopback and documentation ranges are not personal), and not sit inside a longer dotted run like a
version string ``v1.2.3.4.5``; a phone number needs a ``+`` country code, an area code in
parentheses, or dash / dot groups of 3-3-4 digits, so years, prices, dates and plain digit runs
stay; a resident ID needs a real birth date and the ISO 7064 MOD 11-2 check character. Chinese
text has no spaces, so the Chinese patterns are bounded by "no digit next to it" rather than
word boundaries, and every pattern is ASCII-bounded (`re.ASCII`): a Han character next to an
address is not part of it.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from dataclasses import dataclass

from megalm.data.cli import option

EMAIL_PLACEHOLDERS = ("email@example.com", "firstname.lastname@example.org")
IP_PLACEHOLDERS = ("22.214.171.124", "126.96.36.199", "188.8.131.52", "184.108.40.206", "220.127.116.11",
                   "18.104.22.168")
PHONE_PLACEHOLDER = "555-0100"
CN_MOBILE_PLACEHOLDER = "13000000000"
CN_ID_PLACEHOLDER = "000000000000000000"


@dataclass
class PIIConfig:
    redact_email: bool = option(True, "Replace e-mail addresses with email@example.com (or "
                                      "firstname.lastname@example.org).")
    redact_ip: bool = option(True, "Replace public IPv4 / IPv6 addresses with one of datatrove's placeholder "
                                   "addresses.")
    redact_phone: bool = option(True, "Replace phone numbers (+country code, (area) code, or 3-3-4 digit "
                                      "groups) with 555-0100.")
    redact_cn_id: bool = option(True, "Replace Chinese resident ID numbers (18 digits, valid check character) "
                                      "with 000000000000000000.")
    redact_cn_mobile: bool = option(True, "Replace Chinese mobile numbers (1[3-9] + 9 digits, +86 optional) "
                                          "with 13000000000.")

    def kinds(self) -> list[str]:
        """The kinds switched on, in the order they are applied."""
        return [kind for kind in KINDS if getattr(self, f"redact_{kind}")]


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])", re.ASCII)
# Dotted or coloned runs; `ipaddress` decides whether a run is an address.
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
                   r"(?![\w:.])", re.ASCII)
_PHONE = re.compile(r"(?<![\w+.-])(?:"
                    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,5}"  # +44 20 7946 0958, +1 (555) 123-4567
                    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{4}"               # (555) 123-4567
                    r"|\d{3}([.-])\d{3}\1\d{4}"                          # 555-123-4567, 555.123.4567
                    r")(?![\w-]|\.\d)", re.ASCII)
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:\d{8}|[ -]\d{4}[ -]\d{4})(?!\d)", re.ASCII)
_CN_ID = re.compile(r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dXx])", re.ASCII)

_ID_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]
_ID_CHECK = "10X98765432"  # the check character for each value of (sum of weighted digits) mod 11


def valid_cn_id(number: str) -> bool:
    """ISO 7064 MOD 11-2: the 18th character checks the weighted sum of the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17].upper()


def _public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


def _pick(placeholders: tuple[str, ...], match: str) -> str:
    return placeholders[zlib.crc32(match.encode("utf-8")) % len(placeholders)]


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


# kind -> (patterns, validator or None, placeholder(s)); applied in this order: an e-mail may hold
# digits, an ID holds a mobile-like run, so the longer forms go first.
_RULES = {
    "email": ((_EMAIL,), None, EMAIL_PLACEHOLDERS),
    "cn_id": ((_CN_ID,), valid_cn_id, CN_ID_PLACEHOLDER),
    "ip": ((_IPV4, _IPV6), _public_ip, IP_PLACEHOLDERS),
    "cn_mobile": ((_CN_MOBILE,), None, CN_MOBILE_PLACEHOLDER),
    "phone": ((_PHONE,), lambda m: 8 <= _digits(m) <= 15, PHONE_PLACEHOLDER),
}
KINDS = tuple(_RULES)


class PIIRedactor:
    def __init__(self, config: PIIConfig):
        self.kinds = config.kinds()

    def redact(self, text: str) -> tuple[str, dict]:
        """`text` with every match replaced, and the number replaced per kind (kinds with none left out)."""
        counts = {}
        for kind in self.kinds:
            patterns, valid, placeholder = _RULES[kind]
            for pattern in patterns:
                text, n = self._replace(pattern, valid, placeholder, text)
                if n:
                    counts[kind] = counts.get(kind, 0) + n
        return text, counts

    @staticmethod
    def _replace(pattern: re.Pattern, valid, placeholder, text: str) -> tuple[str, int]:
        n = 0

        def substitute(match: re.Match) -> str:
            nonlocal n
            found = match.group(0)
            if valid is not None and not valid(found):
                return found
            n += 1
            return placeholder if isinstance(placeholder, str) else _pick(placeholder, found)

        return pattern.sub(substitute, text), n
