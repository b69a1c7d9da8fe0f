"""One spelling per identity: emails (and tenant names) as they are compared and stored.

Unicode lets one address be written many ways that look the same: `é` precomposed (NFC) or as
`e` and a combining accent (NFD), fullwidth letters (U+FF41 for `a`, ...), invisible characters (a
zero-width joiner) and bidi controls that reorder what is shown. Every email that enters
(signup, login, a created user, a search) goes through `normal_email`: invisible and control
characters are refused, and the rest is NFKC-normalised, which composes accents as NFC does and
also folds compatibility look-alikes (fullwidth and mathematical letters, ligatures) into the
plain letters they stand for, so they reach the same account rather than a second one. Case is
folded where emails are compared (the unique index on lower(email)), as before.
"""

from __future__ import annotations

import re
import unicodedata

from handlers.identity.api import EMAIL
from server.errors import ValidationFailed
from server.openapi import INVISIBLE

INVISIBLE_MESSAGE = "must not contain invisible or bidirectional control characters"
# The same class the email's schema pattern excludes, so what /openapi.json says and what the
# server refuses agree.
_INVISIBLE = re.compile(f"[{INVISIBLE}]")
_EMAIL = re.compile(str(EMAIL["pattern"]))
_EMAIL_LENGTHS = range(int(str(EMAIL["minLength"])), int(str(EMAIL["maxLength"])) + 1)


def visible(value: str, field: str) -> str:
    """`value` in NFC, or ValidationFailed naming `field` if it holds an invisible character."""
    if value.isascii() and value.isprintable():  # nearly every value: nothing to look at
        return value
    if _INVISIBLE.search(value) is not None:
        raise ValidationFailed([{"field": field, "message": INVISIBLE_MESSAGE}])
    return unicodedata.normalize("NFC", value)


def fold(value: str) -> str:
    """NFKC: accents composed, compatibility look-alikes folded into the letters they stand for."""
    return value if value.isascii() else unicodedata.normalize("NFKC", value)


def normal_email(value: str, field: str = "email") -> str:
    """The one spelling of an email address (see the module's docstring), or ValidationFailed."""
    if value.isascii() and value.isprintable():
        return value
    visible(value, field)
    email = fold(value)
    # Folding can change the shape (a fullwidth @, U+FF20, is a second @) or the length.
    if email != value:
        visible(email, field)
        if len(email) not in _EMAIL_LENGTHS or _EMAIL.match(email) is None:
            raise ValidationFailed(
                [{"field": field, "message": "is not an email address once normalised"}]
            )
    return email
