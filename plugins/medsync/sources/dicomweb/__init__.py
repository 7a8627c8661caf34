"""Protocol ``dicomweb``: a PACS through QIDO-RS (search) and WADO-RS (files), e.g. Orthanc, dcm4chee.

Modules: ``spec`` (the ``api:`` section, pydantic only), ``tags`` (the DICOM attributes read per
level), ``client`` (QIDO-RS paging, Orthanc's change feed), ``hook`` (the Airflow connection),
``versions`` (a record's version when the PACS gives none), ``records`` (DICOM JSON -> A's
columns, ``docs/dicomweb-mapping.md``), ``source`` (the ``Source``), ``mirror`` (files into A's bucket).
"""
