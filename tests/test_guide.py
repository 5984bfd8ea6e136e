"""The curl commands of the API guide, run as written against a live deployment.

The guide (../shared/spec/API_CURL_GUIDE.md) is the contract. Each bash block of
sections 2.1 and 2.2 is executed by bash with only the service address, the key
placeholder and the example file paths substituted.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import DEFAULT_KEY, ROOT, Cluster

pytestmark = pytest.mark.e2e
GUIDE = ROOT.parent / "shared" / "spec" / "API_CURL_GUIDE.md"


def guide_blocks(section_prefixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(heading, bash block) for every curl block under headings starting with the prefixes."""
    assert GUIDE.is_file(), f"the API guide is missing at {GUIDE}"
    blocks, heading = [], ""
    for part in re.split(r"(^#+ .*$)", GUIDE.read_text(encoding="utf-8"), flags=re.M):
        if part.startswith("#"):
            heading = part.lstrip("# ").strip()
            continue
        for block in re.findall(r"```bash\n(.*?)```", part, flags=re.S):
            if "curl" in block and heading.startswith(section_prefixes):
                blocks.append((heading, block))
    return blocks


GENERATION = guide_blocks(("2.1.", "2.2."))


def test_the_guide_has_the_expected_generation_examples() -> None:
    assert len(GENERATION) == 13, [h for h, _ in GENERATION]  # 2.1.1-2.1.8 JSON, 2.2.1-2.2.5 upload


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path):
    from tests.conftest import Processes

    workdir = tmp_path_factory.mktemp("guide")
    procs = Processes(workdir)
    try:
        yield Cluster(procs, tiny_models, workdir / "broker"), workdir
    finally:
        procs.close()


@pytest.mark.parametrize("heading, block", GENERATION, ids=[h.split()[0] for h, _ in GENERATION])
def test_generation_curl_works_as_written(deployment, heading: str, block: str) -> None:
    cluster, workdir = deployment
    for name in ("input_image", "mask_image", "depth_image"):
        path = workdir / f"{name}.png"
        if not path.exists():
            Image.new("RGB", (1, 1), (255, 255, 255)).save(path)
    script = (block.replace("http://localhost:12411", cluster.url)
                   .replace("YOUR_API_KEY", DEFAULT_KEY)
                   .replace("/path/to/", f"{workdir}/"))
    out = subprocess.run(["bash", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["success"] is True, body
    image = Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1])))
    assert image.format == "PNG" and image.size == (1024, 1024)
    assert body["metadata"]["steps"] == 50 and body["metadata"]["seed"] == 42
