"""Fetches the Prometheus and Grafana releases that modules/monitoring deploys.

The monitoring host has no internet (the pool's VPC has no NAT), so the
releases travel like the pool's binaries: downloaded here from their official
URLs, checked against the sha256 pinned in infra/monitoring/releases.json,
uploaded by Terraform to the artifact bucket, and checked again against the
same pin on the host after it fetches them from S3.

  python3 infra/fetch-monitoring.py [OUT_DIR]         download and verify (default target/infra)
  python3 infra/fetch-monitoring.py --pin             pin the sha256 of each release

--pin reads each release's official checksum file (Prometheus'
sha256sums.txt, Grafana's .sha256 next to the tarball) and writes its
sha256 into releases.json; review the diff and commit it. Without --pin an
unpinned release or a checksum that differs from the pin or from the
official file is an error, and nothing is written.
"""

import hashlib
import json
import os
import sys
import urllib.request

INFRA = os.path.dirname(os.path.abspath(__file__))
RELEASES = os.path.join(INFRA, "monitoring", "releases.json")


def get(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def official_sha256(release):
    """The sha256 the release's official checksum file gives its tarball."""
    name = release["url"].rsplit("/", 1)[1]
    lines = get(release["checksums_url"]).decode().splitlines()
    for line in lines:
        parts = line.split()
        if len(parts) == 1 and len(lines) == 1:
            return parts[0].lower()  # Grafana's .sha256: the digest alone
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return parts[0].lower()
    sys.exit(f"{release['checksums_url']} names no {name}")


def main():
    with open(RELEASES) as f:
        releases = json.load(f)
    if sys.argv[1:2] == ["--pin"]:
        for what, release in releases.items():
            release["sha256"] = official_sha256(release)
            print(f"{what} {release['version']}: sha256 {release['sha256']}")
        with open(RELEASES, "w") as f:
            json.dump(releases, f, indent=2)
            f.write("\n")
        return
    out = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "target/infra", "monitoring")
    os.makedirs(out, exist_ok=True)
    for what, release in releases.items():
        pin = release["sha256"]
        if len(pin) != 64:
            sys.exit(f"{what} {release['version']} has no pinned sha256 in {RELEASES}: run with --pin first")
        official = official_sha256(release)
        if official != pin:
            sys.exit(f"{what} {release['version']}: the official checksum {official} is not the pin {pin}")
        path = os.path.join(out, release["url"].rsplit("/", 1)[1])
        if os.path.exists(path) and hashlib.sha256(open(path, "rb").read()).hexdigest() == pin:
            print(f"{what} {release['version']}: {path} (already there)")
            continue
        data = get(release["url"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != pin:
            sys.exit(f"{what} {release['version']}: {release['url']} has sha256 {digest}, not the pin {pin}")
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
        print(f"{what} {release['version']}: {path} (sha256 verified)")


if __name__ == "__main__":
    main()
