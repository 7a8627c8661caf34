"""The medsync page as an Airflow 3 plugin: a FastAPI app in the API server and a UI nav entry.

The app is mounted at ``/medsync`` (``medsync.ui.app``); the external view puts **medsync**
in the UI's navigation, which shows the app's page in an iframe of the UI (same origin, so
the UI's login cookie reaches the app, which checks it). Nothing of Flask or FAB.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

from medsync.ui.app import create_app

URL_PREFIX = "/medsync"
# An Airflow served under a path (``[api] base_url`` = https://host/airflow/) serves the app there too.
_ROOT = urlsplit(conf.get("api", "base_url", fallback="") or "/").path.rstrip("/")


class MedsyncUiPlugin(AirflowPlugin):
    name = "medsync_ui"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "medsync"}]
    external_views = [
        {
            "name": "medsync",
            "href": f"{_ROOT}{URL_PREFIX}/",
            "destination": "nav",
            "url_route": "medsync",
            "nav_top_level": True,
        }
    ]
