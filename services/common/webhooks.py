"""Standard Webhooks (standardwebhooks.com) secrets and signatures, for what Callmesh verifies (the recorder's
webhooks, at ingest) and what it signs (the records crm posts to the CRM).

A signature is HMAC-SHA256 over ``"{webhook-id}.{webhook-timestamp}.{raw body}"`` under a shared ``whsec_<base64>``
secret, sent as ``webhook-signature: v1,<base64>``; the ``standardwebhooks`` package computes and checks it."""

from __future__ import annotations

import binascii
from datetime import datetime, timezone

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from services.common.config import ConfigError


def webhook_secret(setting: str, secret: str) -> Webhook:
    """The ``whsec_<base64>`` ``secret`` given in ``setting`` (its name, and which one for a list), or a
    :class:`ConfigError` that says what is wrong with it."""
    if not secret.startswith("whsec_"):
        raise ConfigError(f"{setting} must be written whsec_<base64>")
    try:
        return Webhook(secret)
    except (binascii.Error, ValueError, EmptyWebhookSecretError) as exc:
        raise ConfigError(f"{setting} is not valid base64 after whsec_") from exc


def signature_headers(secret: Webhook, webhook_id: str, body: bytes, at: float) -> dict[str, str]:
    """The headers that sign ``body`` as the message ``webhook_id`` sent at ``at`` (Unix seconds)."""
    timestamp = int(at)
    signature = secret.sign(webhook_id, datetime.fromtimestamp(timestamp, timezone.utc), body.decode())
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}
