"""Tell someone that results await review: a webhook POST and/or an e-mail (``review`` settings).

The notice names the job, the input series UID and the waiting destinations, and a link to
the job page when ``review.dashboard_url`` is set -- never a patient's name, ID or birth
date. Sending runs on a short-lived daemon thread with a timeout: a slow or dead webhook or
mail server costs a log line, never a staged delivery or a worker.
"""

from __future__ import annotations

import json
import logging
import smtplib
import threading
import urllib.error
import urllib.request
from email.message import EmailMessage
from typing import Any

from radnode.config.model import ReviewSettings

log = logging.getLogger(__name__)


def awaiting_notice(settings: ReviewSettings, job_id: int, series_uid: str, destinations: list[str]) -> dict[str, Any]:
    """The JSON body of the notice (no PHI)."""
    notice: dict[str, Any] = {
        "event": "awaiting_review", "job_id": int(job_id), "series_uid": series_uid, "destinations": list(destinations),
    }
    if settings.dashboard_url:
        notice["url"] = f"{settings.dashboard_url.rstrip('/')}/jobs/{int(job_id)}"
    return notice


class Notifier:
    """Sends the awaiting-review notice to the configured webhook and mail recipients."""

    def __init__(self, settings: ReviewSettings) -> None:
        self.settings = settings

    @property
    def enabled(self) -> bool:
        return bool(self.settings.webhook_url or (self.settings.smtp_host and self.settings.mail_to))

    def awaiting_review(self, job_id: int, series_uid: str, destinations: list[str]) -> threading.Thread | None:
        """Send the notice in the background (returns the thread, ``None`` when nothing is configured)."""
        if not self.enabled:
            return None
        notice = awaiting_notice(self.settings, job_id, series_uid, destinations)
        thread = threading.Thread(target=self.send, args=(notice,), name=f"radnode-notify-{job_id}", daemon=True)
        thread.start()
        return thread

    def send(self, notice: dict[str, Any]) -> dict[str, bool]:
        """Send ``notice`` now; which channels succeeded (failures are logged, never raised)."""
        done: dict[str, bool] = {}
        if self.settings.webhook_url:
            done["webhook"] = self._post(notice)
        if self.settings.smtp_host and self.settings.mail_to:
            done["mail"] = self._mail(notice)
        return done

    def _post(self, notice: dict[str, Any]) -> bool:
        url = str(self.settings.webhook_url)
        request = urllib.request.Request(
            url, data=json.dumps(notice).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "radnode"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_seconds) as response:
                response.read(1024)
            log.info("job %s: awaiting-review notice posted to the webhook", notice["job_id"])
            return True
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.error("job %s: awaiting-review webhook failed: %s", notice["job_id"], exc)
            return False

    def _mail(self, notice: dict[str, Any]) -> bool:
        message = EmailMessage()
        message["Subject"] = f"radnode: job {notice['job_id']} awaits review"
        message["From"] = self.settings.mail_from
        message["To"] = ", ".join(self.settings.mail_to)
        lines = [
            f"Automatic contours of job {notice['job_id']} wait for a reviewer before they go to "
            f"{', '.join(notice['destinations'])}.",
            f"Series Instance UID: {notice['series_uid']}",
        ]
        if "url" in notice:
            lines.append(f"Review: {notice['url']}")
        message.set_content("\n".join(lines) + "\n")
        try:
            with smtplib.SMTP(str(self.settings.smtp_host), self.settings.smtp_port,
                              timeout=self.settings.timeout_seconds) as smtp:
                smtp.ehlo()
                if smtp.has_extn("starttls"):
                    smtp.starttls()
                    smtp.ehlo()
                smtp.send_message(message)
            log.info("job %s: awaiting-review notice mailed to %d recipient(s)", notice["job_id"], len(self.settings.mail_to))
            return True
        except (smtplib.SMTPException, OSError) as exc:
            log.error("job %s: awaiting-review e-mail failed: %s", notice["job_id"], exc)
            return False
