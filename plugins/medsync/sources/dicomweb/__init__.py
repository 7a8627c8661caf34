"""Protocol ``dicomweb``: a PACS through QIDO-RS (search) and WADO-RS (files), e.g. Orthanc, dcm4chee.

Modules: ``spec`` (the ``api:`` section, pydantic only), ``tags`` (the DICOM attributes read per
level), ``client`` (QIDO-RS paging, WADO-RS files), ``feed`` (Orthanc's change feed, kept like a
watermark), ``hook`` (the Airflow connection, paced and retried), ``versions`` (a record's version
when the PACS gives none), ``records`` (DICOM JSON -> A's columns, ``docs/dicomweb-mapping.md``),
``source`` (the ``Source``). Files are copied into A's bucket by the generic ``medsync.mirror``.
"""
