"""medsync's connection types, as Airflow's ProvidersManager discovers them.

Airflow lists a connection type (the connection form's "Connection Type", its field labels and
placeholders) only when an installed distribution declares it under the ``apache_airflow_provider``
entry point; a hook class alone, even with ``get_ui_field_behaviour()``, is never found. This
package is that declaration and nothing else: the hooks are medsync's own
(``medsync.sources.rest.hook.RestSourceHook``, ``medsync.sources.dicomweb.hook.DicomwebHook``,
importable where Airflow puts ``plugins/`` on the path), imported by Airflow only when it needs the
class. The form's metadata is plain data here (Airflow 3.2+ reads it without importing hooks), so
discovery never imports medsync or Airflow: it runs in every Airflow process and must not fail.

A connection of type ``http`` keeps working for both hooks: they read the connection's fields
whatever its type.
"""

from __future__ import annotations

from typing import Any

PACKAGE_NAME = "medsync-airflow-provider"

MEDSYNC_REST: dict[str, Any] = {
    "connection-type": "medsync_rest",
    "hook-class-name": "medsync.sources.rest.hook.RestSourceHook",
    "hook-name": "medsync: REST source",
    "ui-field-behaviour": {
        "hidden-fields": [],
        "relabeling": {
            "host": "Base URL (or host name)",
            "schema": "Scheme (http or https, bare host only)",
            "password": "Secret: API key or bearer token (basic auth: password)",
            "login": "Login (basic auth only)",
        },
        "placeholders": {
            "host": "https://b.example.internal/api/v1",
            "schema": "https",
            "extra": '{"timeout": 30, "base_path": "/api/v1"}',
        },
    },
}
"""A ``protocol: rest`` source's API (``connections.api_conn_id``): where its secret goes."""

MEDSYNC_DICOMWEB: dict[str, Any] = {
    "connection-type": "medsync_dicomweb",
    "hook-class-name": "medsync.sources.dicomweb.hook.DicomwebHook",
    "hook-name": "medsync: PACS (DICOMweb)",
    "ui-field-behaviour": {
        "hidden-fields": [],
        "relabeling": {
            "host": "Base URL (e.g. https://pacs.example.internal)",
            "login": "User (basic auth; empty for a bearer token)",
            "password": "Password, or the bearer token when User is empty",
        },
        "placeholders": {
            "extra": '{"timeout": 30}',
            "host": "https://pacs.example.internal",
        },
    },
}
"""A ``protocol: dicomweb`` source's PACS."""


def get_provider_info() -> dict[str, Any]:
    """The provider's info, as the ``apache_airflow_provider`` entry point returns it."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "medsync",
        "description": "medsync's connection types: a REST source's API and a PACS's DICOMweb.",
        "versions": ["0.1.0"],
        "connection-types": [MEDSYNC_REST, MEDSYNC_DICOMWEB],
    }
