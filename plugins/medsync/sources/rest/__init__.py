"""Protocol ``rest``: any paged JSON-over-HTTP API described as data in a source config's ``api:`` section.

Modules:

- ``spec``: the pydantic model of the ``api:`` section (:class:`~medsync.sources.rest.spec.RestApi`);
  its field docstrings are the reference of what a source config may say. Imports only pydantic.
- ``client``: :class:`~medsync.sources.rest.client.RestClient`, the transport (auth, paging, windows,
  retries, rate limit, restart on expiry, deletion feed, counts). No Airflow import.
- ``hook``: :class:`~medsync.sources.rest.hook.RestSourceHook`, an Airflow connection -> a client.
- ``converters``, ``records``: the record parser; ``source``: the protocol's ``Source``.

Nothing heavy is imported here: configs are validated while DAG files are parsed.
"""
