#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers from Debian trixie's libonnxruntime-dev
# package and unpack them under custom_ops/third_party/onnxruntime/.
#
# Only the package index of trixie is downloaded (into a private apt directory);
# the system's apt configuration and installed packages are left untouched.
# Running it again when the headers are already present does nothing.
#
# Environment:
#   QSD_HEADERS_DEST  where to unpack (default custom_ops/third_party/onnxruntime)
#   QSD_ORT_DEB       path to an already downloaded libonnxruntime-dev .deb (skips apt)
#   QSD_DEBIAN_MIRROR mirror URL (default http://deb.debian.org/debian)
#   QSD_DEBIAN_SUITE  suite (default trixie)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${QSD_HEADERS_DEST:-${here}/third_party/onnxruntime}"
header="${dest}/usr/include/onnxruntime/onnxruntime_c_api.h"

if [[ -f "${header}" ]]; then
    echo "ONNX Runtime headers already present: ${dest}/usr/include/onnxruntime"
    exit 0
fi

for tool in dpkg-deb; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "error: '${tool}' not found; this script needs a Debian-based system" >&2
        exit 1
    fi
done

work="$(mktemp -d)"
cleanup() { rm -rf "${work}"; }
trap cleanup EXIT

deb="${QSD_ORT_DEB:-}"
if [[ -z "${deb}" ]]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get not found; set QSD_ORT_DEB to a libonnxruntime-dev .deb" >&2
        exit 1
    fi
    mirror="${QSD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    suite="${QSD_DEBIAN_SUITE:-trixie}"
    keyring=""
    for k in /usr/share/keyrings/debian-archive-keyring.gpg \
             /usr/share/keyrings/debian-archive-trixie-stable.gpg; do
        if [[ -f "${k}" ]]; then keyring="${k}"; break; fi
    done
    if [[ -z "${keyring}" ]]; then
        echo "error: no Debian archive keyring found; install the debian-archive-keyring package" >&2
        exit 1
    fi
    mkdir -p "${work}/etc/preferences.d" "${work}/etc/apt.conf.d" \
             "${work}/lists/partial" "${work}/cache/archives/partial" "${work}/dl"
    echo "deb [signed-by=${keyring}] ${mirror} ${suite} main" > "${work}/etc/sources.list"
    apt_opts=(
        -o "Dir::Etc::sourcelist=${work}/etc/sources.list"
        -o "Dir::Etc::sourceparts=${work}/etc/apt.conf.d"
        -o "Dir::Etc::preferencesparts=${work}/etc/preferences.d"
        -o "Dir::State::lists=${work}/lists"
        -o "Dir::State::status=/dev/null"
        -o "Dir::Cache=${work}/cache"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
        -o "Debug::NoLocking=1"
    )
    echo "Downloading the ${suite} package index from ${mirror} ..."
    if ! apt-get "${apt_opts[@]}" -qq update; then
        echo "error: could not download the ${suite} package index from ${mirror}" >&2
        exit 1
    fi
    echo "Downloading libonnxruntime-dev ..."
    if ! (cd "${work}/dl" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev); then
        echo "error: could not download libonnxruntime-dev from ${suite}; if the index" \
             "signature was rejected, update the debian-archive-keyring package" \
             "(or set QSD_ORT_DEB to a downloaded .deb)" >&2
        exit 1
    fi
    deb="$(ls "${work}"/dl/libonnxruntime-dev_*.deb | head -n 1)"
fi

if [[ ! -f "${deb}" ]]; then
    echo "error: libonnxruntime-dev package not found (${deb})" >&2
    exit 1
fi

rm -rf "${dest}.tmp"
mkdir -p "${dest}.tmp"
dpkg-deb -x "${deb}" "${dest}.tmp"
if [[ ! -f "${dest}.tmp/usr/include/onnxruntime/onnxruntime_c_api.h" ]]; then
    echo "error: ${deb} does not contain usr/include/onnxruntime/onnxruntime_c_api.h" >&2
    rm -rf "${dest}.tmp"
    exit 1
fi
dpkg-deb -f "${deb}" Version > "${dest}.tmp/VERSION"
rm -rf "${dest}"
mv "${dest}.tmp" "${dest}"
version="$(grep -m1 -E '^#define ORT_API_VERSION' "${header}" | awk '{print $3}')"
echo "ONNX Runtime headers $(cat "${dest}/VERSION") (ORT_API_VERSION ${version}) in ${dest}/usr/include/onnxruntime"
