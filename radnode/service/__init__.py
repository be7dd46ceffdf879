"""Running radnode as an operating-system service (systemd).

* :mod:`radnode.service.sdnotify`: readiness, watchdog pings, status and stopping
  notifications over ``$NOTIFY_SOCKET`` (``Type=notify`` units), stdlib only;
* :mod:`radnode.service.reload`: apply a re-read configuration on SIGHUP
  (``systemctl reload radnode``) without dropping associations;
* :mod:`radnode.service.install`: ``radnode install-systemd`` / ``uninstall-systemd``.

The unit files themselves live in the repository's ``systemd/`` folder; operating them is
described in ``docs/operations.md``. Nothing here imports the node, the pipeline or torch.
"""

from radnode.service.reload import ReloadOutcome, reload_settings
from radnode.service.sdnotify import (
    SystemdNotifier,
    WatchdogThread,
    liveness_from_health,
    watchdog_interval,
)

__all__ = ["ReloadOutcome", "SystemdNotifier", "WatchdogThread", "liveness_from_health", "reload_settings", "watchdog_interval"]
