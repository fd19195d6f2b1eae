"""Alerts to a Slack-compatible incoming webhook (ALERT_WEBHOOK_URL), and the freshness rules.

`AlertWebhook.post` sends one message and says whether a failure is worth retrying; the outbox in
`persona_pipeline.db.alerts` does the retrying, with backoff, across sensor ticks. An empty URL
turns alerts off: nothing is recorded and nothing is sent.

The webhook URL is a secret (anyone holding it can post to the channel), so it never appears in
an error or a log line: messages say "ALERT_WEBHOOK_URL" instead, and requests' own exception texts,
which hold the URL, are not passed on.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import dagster as dg
import requests

from persona_pipeline.domain.links import Links
from persona_pipeline.domain.retry import parse_retry_after

# Slack's limits: 3000 characters in a section's text; the fallback text is kept short.
SECTION_LIMIT = 3000
FALLBACK_LIMIT = 300

TITLES = {
    "run_failure": ":red_circle: Run failed",
    "freshness": ":warning: Content running low",
    "freshness_resolved": ":white_check_mark: Content back on track",
    "persona_file": ":warning: persona.yaml problem",
}


class AlertDeliveryError(Exception):
    """A message the webhook did not take. `permanent`: retrying cannot help (a revoked or archived
    webhook, a rejected payload); otherwise try again, after `retry_after` seconds when the server
    asked for a wait."""

    def __init__(self, message: str, *, retry_after: float | None = None, permanent: bool = False,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent
        self.status = status


def _escape(text: str) -> str:
    """Slack mrkdwn treats &, < and > as control characters (links, mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def redact_webhook(text: str, url: str) -> str:
    """`text` without the webhook URL or its path: the path is the secret, and an error page (a proxy's
    "Cannot POST /services/...") may echo it back into a log line or `alerts.last_error`."""
    url = url.strip()
    path = urlsplit(url).path
    for secret in sorted({url, path, quote(path)} - {"", "/"}, key=len, reverse=True):
        text = text.replace(secret, "<ALERT_WEBHOOK_URL>")
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_payload(*, title: str, text: str, persona: str | None, subject: str, link: str | None, kind: str) -> dict[str, Any]:
    """The message in Slack's incoming-webhook format: a plain `text` (notifications, clients
    without blocks) and blocks with the persona, the job or asset, the details and the link."""
    who = persona or "all personas"
    fallback = _clip(f"{title}: {who} · {subject} · {text.splitlines()[0] if text else ''}".rstrip(" ·"), FALLBACK_LIMIT)
    link_line = f"\n<{link}|View in Dagster>" if link else ""
    body = f"*{_escape(title)}*\n*Persona:* {_escape(who)}\n*Job/asset:* {_escape(subject)}\n"
    details = _clip(_escape(text), SECTION_LIMIT - len(body) - len(link_line))
    return {
        "text": fallback,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": body + details + link_line}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"persona-pipeline · {kind}"}]},
        ],
    }


class AlertWebhook(dg.ConfigurableResource):
    """Where alerts go. `url` is ALERT_WEBHOOK_URL (passed as dg.EnvVar when set, so the UI shows
    the variable, not the secret); "" turns alerts off. `ui_base_url` is DAGSTER_UI_BASE_URL, for
    links to runs and assets."""

    url: str = ""
    ui_base_url: str = "http://localhost:3000"
    timeout_s: float = 5.0
    max_attempts: int = 8

    @property
    def enabled(self) -> bool:
        return bool(self.url.strip())

    def run_url(self, run_id: str) -> str:
        return Links(dagster_ui=self.ui_base_url, review="").run_url(run_id)

    def asset_url(self, asset: str, partition: str | None = None) -> str:
        return Links(dagster_ui=self.ui_base_url, review="").asset_url(asset, partition)

    def message(self, *, kind: str, text: str, persona: str | None, subject: str, link: str | None) -> dict[str, Any]:
        return slack_payload(title=TITLES.get(kind, "Alert"), text=text, persona=persona, subject=subject, link=link, kind=kind)

    def post(self, payload: dict[str, Any]) -> None:
        """Send one message; raises AlertDeliveryError. 2xx = delivered. Connection errors,
        timeouts, 429 and 5xx may pass (retryable); any other answer will not (permanent)."""
        if not self.enabled:
            raise AlertDeliveryError("ALERT_WEBHOOK_URL is not set", permanent=True)
        try:
            response = requests.post(self.url.strip(), json=payload, timeout=self.timeout_s)
        except requests.Timeout:
            raise AlertDeliveryError(f"ALERT_WEBHOOK_URL did not answer within {self.timeout_s:g} s") from None
        except requests.RequestException as exc:
            # str(exc) names the URL: only the kind of failure is passed on.
            raise AlertDeliveryError(f"ALERT_WEBHOOK_URL could not be reached ({type(exc).__name__})") from None
        if 200 <= response.status_code < 300:
            return
        body = _clip(" ".join(redact_webhook(response.text, self.url).split()), 200) if response.text else ""
        detail = f"ALERT_WEBHOOK_URL answered HTTP {response.status_code}" + (f": {body}" if body else "")
        if response.status_code == 429 or response.status_code >= 500:
            raise AlertDeliveryError(detail, retry_after=parse_retry_after(response.headers.get("Retry-After")),
                                     status=response.status_code)
        # Slack: 404 no_service (webhook revoked), 410 channel_is_archived, 403 action_prohibited,
        # 400 invalid_payload: sending the same message again cannot succeed.
        raise AlertDeliveryError(detail, permanent=True, status=response.status_code)


class FreshnessRules(dg.ConfigurableResource):
    """PERSONA_FRESHNESS_DAYS: a persona is stale when its scheduled posts cover fewer days ahead
    than this, or its approved, unposted library would run dry within it at its posting rate."""

    min_days_ahead: float = 3.0
