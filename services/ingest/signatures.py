"""Standard Webhooks signatures on the recorder's webhook (standardwebhooks.com).

The recorder signs ``"{webhook-id}.{webhook-timestamp}.{raw body}"`` with
HMAC-SHA256 under a shared ``whsec_`` secret and sends ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature: v1,<base64>``. The
``standardwebhooks`` package does the HMAC, the constant-time comparison and
the ±5 minute window; this module adds several active secrets (rotation
without downtime: the recorder may sign with the old or the new one) and
turns every failure into a reason the webhook can give back with its 401.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.common.config import ConfigError, env_bool, env_list
from services.common.webhooks import webhook_secret

log = logging.getLogger(__name__)

HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
MAX_WEBHOOK_ID = 256


class SignatureRejected(Exception):
    """The webhook is not signed by anyone we trust; the message says why."""


@dataclass(frozen=True)
class WebhookVerifier:
    """Checks signatures against every active secret, newest first."""

    secrets: tuple[Webhook, ...]
    allow_unsigned: bool = False

    @classmethod
    def from_secrets(cls, secrets: tuple[str, ...], allow_unsigned: bool = False) -> "WebhookVerifier":
        parsed = [webhook_secret(f"WEBHOOK_SECRETS: secret #{i + 1}", secret) for i, secret in enumerate(secrets)]
        if not parsed and not allow_unsigned:
            raise ConfigError("WEBHOOK_SECRETS is empty: set the recorder's whsec_ secret(s), "
                              "or WEBHOOK_ALLOW_UNSIGNED=1 to accept unsigned webhooks on purpose")
        return cls(tuple(parsed), allow_unsigned and not parsed)

    @classmethod
    def from_env(cls) -> "WebhookVerifier":
        """``WEBHOOK_SECRETS`` (comma-separated, newest first), ``WEBHOOK_ALLOW_UNSIGNED`` (0)."""
        return cls.from_secrets(env_list("WEBHOOK_SECRETS"), env_bool("WEBHOOK_ALLOW_UNSIGNED", False))

    @property
    def enforcing(self) -> bool:
        return bool(self.secrets)

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """Return the ``webhook-id`` of a correctly signed webhook (None when unsigned ones are allowed and
        it carries no id); raise SignatureRejected otherwise."""
        msg_id = headers.get("webhook-id") or None
        if msg_id is not None and len(msg_id) > MAX_WEBHOOK_ID:
            raise SignatureRejected(f"webhook-id is longer than {MAX_WEBHOOK_ID} characters")
        if not self.secrets:
            return msg_id
        missing = [h for h in HEADERS if not headers.get(h)]
        if missing:
            raise SignatureRejected(f"missing signature header(s): {', '.join(missing)}")
        if not all(part.count(",") == 1 for part in headers["webhook-signature"].split(" ")):
            raise SignatureRejected("webhook-signature must be space-separated 'v1,<base64>' values")
        wanted = {h: headers[h] for h in HEADERS}
        reason = "no signature matches an active secret"
        for secret in self.secrets:
            try:
                secret.verify(body, wanted, json_parse=False)
                return msg_id
            except WebhookVerificationError as exc:
                text = str(exc)
                if "timestamp" in text.lower() or "headers" in text.lower():
                    # Same answer for every secret: the window is checked before the HMAC.
                    raise SignatureRejected(_timestamp_reason(text)) from exc
            except (binascii.Error, ValueError) as exc:  # undecodable base64 or a body that is not UTF-8
                reason = f"the signature cannot be checked: {exc.__class__.__name__}"
        raise SignatureRejected(reason)


def _timestamp_reason(text: str) -> str:
    if "too old" in text:
        return "webhook-timestamp is more than 5 minutes in the past (stale or replayed webhook)"
    if "too new" in text:
        return "webhook-timestamp is more than 5 minutes in the future"
    return "webhook-timestamp must be Unix seconds"
