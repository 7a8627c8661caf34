#!/usr/bin/env bash
# Makes sure Debian's Orthanc and its DICOMweb plugin are installed (the PACS tests:
# tests/test_dicomweb_*.py, tests/test_orthanc_devstack.py, tests/test_e2e_pacs.py), installing
# them with apt when they are missing. The tests start their own private Orthanc
# (devstack/orthanc.py); nothing here starts one.
set -euo pipefail
orthanc=/usr/sbin/Orthanc
plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if [ -x "$orthanc" ] && [ -f "$plugin" ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "orthanc/orthanc-dicomweb missing and no apt-get here: install them (Debian: orthanc orthanc-dicomweb)" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
# Another apt-get (a test run installing the same packages) may hold dpkg's lock: wait for it.
lock=(-o DPkg::Lock::Timeout=600)
echo "installing orthanc and orthanc-dicomweb with apt" >&2
$sudo apt-get "${lock[@]}" update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq --no-install-recommends \
  orthanc orthanc-dicomweb >/dev/null
[ -x "$orthanc" ] && [ -f "$plugin" ]
