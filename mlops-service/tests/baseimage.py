"""Building the image on an engine that cannot pull its pinned base.

The Dockerfile starts ``FROM python:3.11-slim@sha256:<digest>``: Docker pulls
exactly that image, and a real user's build (``docker build``, ``docker
compose up --build``) always uses it. A machine without registry access gets
a local stand-in under ``python:3.11-slim`` from shared/ci/ensure-docker.sh
(labelled ``standin=true``, made only when the pull fails). No local image can
answer to the digest: it is the hash of the registry's manifest, and Docker
refuses to tag an image with a digest. On such an engine, and only there, the
tests build a copy of the Dockerfile whose one ``FROM`` line names the
stand-in; every other line is the Dockerfile's own.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from servers import SERVICE_DIR

PINNED_FROM = re.compile(r"^FROM (python:3\.11-slim)@sha256:[0-9a-f]{64}$", re.M)


def _local_base_is_a_standin() -> bool:
    result = subprocess.run(["docker", "image", "inspect", "python:3.11-slim"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode:
        return False  # not here: the build pulls the pinned digest itself
    labels = json.loads(result.stdout)[0]["Config"].get("Labels") or {}
    return labels.get("standin") == "true"


def dockerfile_for_this_engine(dockerfile: Path = SERVICE_DIR / "Dockerfile") -> str | None:
    """The Dockerfile text to build here, or None to build the file as it is.

    Not None only when the engine's python:3.11-slim is the local stand-in:
    then the text is the Dockerfile with its pinned FROM line naming the tag.
    """
    if not _local_base_is_a_standin():
        return None
    text = dockerfile.read_text()
    swapped, count = PINNED_FROM.subn(r"FROM \1", text)
    assert count == 1, "the Dockerfile's base is not FROM python:3.11-slim@sha256:<digest>"
    return swapped


def build_command(tag: str, *options: str) -> tuple[list[str], str | None]:
    """``docker`` arguments and standard input that build SERVICE_DIR's image as ``tag``."""
    swapped = dockerfile_for_this_engine()
    if swapped is None:
        return ["build", *options, "-t", tag, str(SERVICE_DIR)], None
    return ["build", *options, "-t", tag, "-f", "-", str(SERVICE_DIR)], swapped


def use_local_base(service_copy: Path) -> None:
    """Point a copy of mlops-service/ (a compose test's checkout) at the stand-in, if needed."""
    dockerfile = service_copy / "Dockerfile"
    swapped = dockerfile_for_this_engine(dockerfile)
    if swapped is not None:
        dockerfile.write_text(swapped)
