"""The web dashboard: overview, jobs, job detail with overlays, rules, audit.

Served by ``radnode serve`` on ``dashboard.host:dashboard.port`` (127.0.0.1:8110).
"""

from radnode.web.app import create_app

__all__ = ["create_app"]
