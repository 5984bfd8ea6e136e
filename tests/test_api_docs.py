"""docs/API.md's examples, run as written against one live deployment.

Every ```bash block of docs/API.md whose first line is ``# example: NAME`` is run by
bash (``set -euo pipefail``), in a folder of its own, with no variables but PATH, HOME,
LC_ALL and those the docs promise: GENSERVE_URL, API_KEY (generation,readonly), ADMIN_KEY
(admin), and INPUT_IMAGE / MASK_IMAGE / CONTROL_IMAGE (small PNG files). Each example must
exit 0 and print what its check in CHECKS expects. The module
also checks that every route the front registers has a heading and an example in the docs,
so the reference cannot silently fall behind the code.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from PIL import Image

from tests.conftest import ROOT, Cluster, Processes

pytestmark = pytest.mark.e2e

DOCS = ROOT / "docs" / "API.md"
MARKER = re.compile(r"#\s*example:\s*([\w.-]+)\s*$")
FENCE_OPEN = re.compile(r"^(\s*)```bash\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
SHELL_TIMEOUT = 60  # seconds per example; they take one or two

# 32+ characters each, so the front logs no weak-key warning.
USER_KEY = "docs-user-key-0123456789abcdefghijklmnop"
ADMIN_KEY = "docs-admin-key-0123456789abcdefghijklmno"
FRONT_KEYS = {"API_KEY_1": f"{USER_KEY}:docs-user:generation,readonly",
              "API_KEY_2": f"{ADMIN_KEY}:docs-admin:admin"}
MODEL_IDS = {"flux1-dev", "flux1-fill-dev", "flux1-depth-dev", "flux1-canny-dev", "flux1-openpose-dev",
             "flux1-redux-dev"}
INPUT_SIZE = (80, 48)  # not square, so img2img's "output takes the input's size" shows


# ---- reading the docs -------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One runnable example: its name, its bash code and where it sits in the docs."""

    name: str
    code: str
    line: int  # 1-based line of the opening fence


@dataclass(frozen=True)
class Section:
    """A heading and the lines up to the next heading of the same or a higher level."""

    level: int
    title: str
    start: int  # 0-based index of the heading line
    end: int  # 0-based index one past the section's last line


def doc_lines(text: str) -> list[tuple[int, str, bool]]:
    """(index, line, inside a code fence) for every line of a Markdown text."""
    out: list[tuple[int, str, bool]] = []
    fenced = False
    for index, line in enumerate(text.splitlines()):
        is_fence = line.lstrip().startswith("```")
        out.append((index, line, fenced or is_fence))
        if is_fence:
            fenced = not fenced
    return out


def doc_examples(text: str) -> list[Example]:
    """Every ```bash block whose first line is ``# example: NAME``, dedented, in document order."""
    examples: list[Example] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE_OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = len(opening.group(1)), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not FENCE_CLOSE.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        i += 1
        marker = MARKER.match(body[0].strip()) if body else None
        if marker:
            examples.append(Example(marker.group(1), "\n".join(body) + "\n", start + 1))
    return examples


def doc_sections(text: str) -> list[Section]:
    """Every Markdown heading outside code blocks, with the extent of its section."""
    found = [(index, HEADING.match(line)) for index, line, fenced in doc_lines(text) if not fenced]
    headings = [(index, len(m.group(1)), m.group(2).replace("`", "")) for index, m in found if m]
    total = len(text.splitlines())
    sections = []
    for n, (index, level, title) in enumerate(headings):
        end = next((i for i, lvl, _ in headings[n + 1:] if lvl <= level), total)
        sections.append(Section(level, title, index, end))
    return sections


def json_values(text: str) -> list[Any]:
    """The JSON values printed one after another (pretty or compact); ValueError if anything else."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return values
        value, pos = decoder.raw_decode(text, pos)
        values.append(value)


DOC_TEXT = DOCS.read_text(encoding="utf-8")
EXAMPLES = doc_examples(DOC_TEXT)


# ---- the deployment ---------------------------------------------------------------------

@dataclass
class Deployment:
    """A running cluster plus the files and environment the examples need."""

    cluster: Cluster
    workdir: Path
    env: dict[str, str]


@dataclass
class Run:
    """What one example did: its output and the folder it ran in."""

    stdout: str
    stderr: str
    cwd: Path
    deployment: Deployment

    @property
    def values(self) -> list[Any]:
        """stdout as a list of JSON values."""
        return json_values(self.stdout)

    @property
    def value(self) -> Any:
        """stdout as exactly one JSON value."""
        values = self.values
        assert len(values) == 1, self.stdout
        return values[0]


def write_images(folder: Path) -> dict[str, str]:
    """Small PNGs for the examples' image variables; returns the variables."""
    input_image, mask_image, control_image = folder / "input.png", folder / "mask.png", folder / "control.png"
    Image.new("RGB", INPUT_SIZE, (200, 120, 40)).save(input_image)
    mask = Image.new("L", INPUT_SIZE, 0)
    mask.paste(255, (20, 12, 60, 36))  # repaint the middle
    mask.save(mask_image)
    control = Image.new("RGB", (64, 64), (0, 0, 0))
    control.paste((255, 255, 255), (16, 16, 48, 48))
    control.save(control_image)
    return {"INPUT_IMAGE": str(input_image), "MASK_IMAGE": str(mask_image), "CONTROL_IMAGE": str(control_image)}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Deployment]:
    """Broker, one tiny-model CPU node and a front, shared by every example of the module."""
    if shutil.which("curl") is None or shutil.which("jq") is None:
        pytest.skip("the examples need curl and jq")
    workdir = tmp_path_factory.mktemp("api-docs")
    procs = Processes(workdir)
    try:
        cluster = Cluster(procs, tiny_models, workdir / "broker", front_env=FRONT_KEYS, key=USER_KEY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "LC_ALL": "C.UTF-8",
               "GENSERVE_URL": cluster.url, "API_KEY": USER_KEY, "ADMIN_KEY": ADMIN_KEY,
               **write_images(workdir)}
        yield Deployment(cluster, workdir, env)
    finally:
        procs.close()


def run_example(example: Example, deployment: Deployment) -> Run:
    """Run one example with bash in a folder of its own; fails the test on a non-zero exit."""
    cwd = deployment.workdir / f"run-{example.name}"
    cwd.mkdir(exist_ok=True)
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + example.code], capture_output=True, text=True,
                         env=deployment.env, cwd=cwd, timeout=SHELL_TIMEOUT)
    assert out.returncode == 0, f"{example.name} (docs/API.md line {example.line}) exited {out.returncode}:\n" \
                                f"{out.stderr}\n--- stdout ---\n{out.stdout}"
    return Run(out.stdout, out.stderr, cwd, deployment)


# ---- what each example must print -------------------------------------------------------
# One check_* per example (CHECKS maps names to them): each asserts what the docs say the
# example prints or writes, so a wrong example or a changed behaviour fails its test.

def png_size(path: Path) -> tuple[int, int]:
    """The size of a PNG file (asserting that it is one)."""
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        assert image.format == "PNG", path
        return image.size


def status_and_body(run: Run) -> tuple[Any, int]:
    """For examples printing a body, then the HTTP status (``curl -w '\\n%{http_code}\\n'``)."""
    values = run.values
    assert len(values) == 2 and isinstance(values[1], int), run.stdout
    return values[0], values[1]


def completed(body: dict[str, Any], mode: str, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Assert a completed task body (images removed by the example); returns its metadata."""
    assert body["success"] is True and body["status"] == "completed", body
    assert body["mode"] == mode and len(body["task_id"]) == 32, body
    assert "image" not in body and "image_base64" not in body  # the example strips them
    meta = body["metadata"]
    if size is not None:
        assert (meta["width"], meta["height"]) == size, meta
    return meta


def check_root(run: Run) -> None:
    body = run.value
    assert body["service"] == "GenServe" and body["status"] == "running" and "/generate" in body["endpoints"]


def check_openapi(run: Run) -> None:
    body = run.value
    assert body["openapi"].startswith("3.1") and body["title"] == "GenServe API" and body["paths"] >= 16, body  # 16 paths, 17 operations


def check_docs_page(run: Run) -> None:
    csp, count = run.stdout.strip().splitlines()
    assert "default-src 'none'" in csp and int(count) >= 1, run.stdout


def check_task_image(run: Run) -> None:
    content_type, signed_status = run.stdout.split()
    assert content_type == "image/webp" and signed_status == "200", run.stdout
    assert Image.open(run.cwd / "out.webp").format == "WEBP"
    assert (run.cwd / "signed.webp").read_bytes() == (run.cwd / "out.webp").read_bytes()


def check_task_events(run: Run) -> None:
    first, last, *rest = run.stdout.splitlines()
    # A snapshot first; unless the task ended before the stream opened: then its final event alone.
    assert first in ("event: snapshot", "event: completed") and last == "event: completed", run.stdout
    assert json.loads("\n".join(rest)) == {"status": "completed", "has_url": True}
    events = (run.cwd / "events.txt").read_text()
    assert events.count("event: completed") == 1


def check_webhook_submit(run: Run) -> None:
    *accepted, refused = run.stdout.strip().splitlines()
    assert json.loads("\n".join(accepted)) == {"success": True, "status": "queued"}, run.stdout
    assert refused == "422", run.stdout


def check_ui_page(run: Run) -> None:
    csp, count = run.stdout.strip().splitlines()
    assert "default-src 'none'" in csp and count == "1", run.stdout


def check_ui_asset(run: Run) -> None:
    asset, escape = run.stdout.strip().splitlines()
    assert asset.startswith("200 text/javascript") and escape == "404", run.stdout


def check_metrics(run: Run) -> None:
    lines = run.stdout.strip().splitlines()
    assert 1 <= len(lines) <= 3 and all(re.match(r'genserve_http_requests_total\{method="\w+",route="[^"]+",'
                                                  r'status="\d{3}"\} \d+\.0$', line) for line in lines), run.stdout


def check_metrics_cluster(run: Run) -> None:
    found = dict(line.rsplit(" ", 1) for line in run.stdout.strip().splitlines())
    assert set(found) == {f'genserve_nodes{{state="{s}"}}' for s in ("busy", "draining", "idle", "leaving")}
    assert float(found['genserve_nodes{state="idle"}']) + float(found['genserve_nodes{state="busy"}']) >= 1


def check_task_list(run: Run) -> None:
    body = run.value
    assert body["success"] is True and 1 <= body["count"] <= 2 and body["has_urls"] is True
    assert body["statuses"] == ["completed"] * body["count"], body


def check_auth_errors(run: Run) -> None:
    values = run.values
    assert values[1::2] == [401, 401, 403], run.stdout
    assert all(set(body) == {"detail"} for body in values[0::2]), run.stdout


def check_retry_after(run: Run) -> None:
    assert run.value == 200
    assert json.loads((run.cwd / "status.json").read_text())["success"] is True


def check_health(run: Run) -> None:
    body = run.value
    assert body["status"] == "healthy" and body["broker"] == "ok" and body["nodes"] == 1 and body["reason"] is None


def check_status(run: Run) -> None:
    body = run.value
    assert body["success"] is True and body["node_count"] == 1 and "length" in body["queue"]
    assert all(node["task_id"] is None for node in body["nodes"])  # hidden from non-admin keys


def check_models(run: Run) -> None:
    models = {m["model_id"]: m for m in run.values}
    assert set(models) == MODEL_IDS
    assert models["flux1-canny-dev"]["controlnet_type"] == "canny" and models["flux1-dev"]["controlnet_type"] is None
    assert set(models["flux1-fill-dev"]["modes"]) == {"text2img", "img2img", "fill"}


def check_loras(run: Run) -> None:
    body = run.value
    assert body["success"] is True and body["total"] == len(body["loras"]) >= 1
    assert all(entry["name"].endswith(".safetensors") for entry in body["loras"])


def check_text2img(run: Run) -> None:
    meta = completed(run.value, "text2img", (64, 64))
    assert meta["seed"] == 7 and meta["steps"] == 2 and meta["cfg"] == 3.5
    assert png_size(run.cwd / "fox.png") == (64, 64)


def check_size_rounding(run: Run) -> None:
    assert run.value == {"width": 96, "height": 64}


def check_img2img(run: Run) -> None:
    completed(run.value, "img2img", INPUT_SIZE)


def check_fill(run: Run) -> None:
    meta = completed(run.value, "fill", (64, 64))
    assert meta["model_id"] == "flux1-fill-dev" and meta["cfg"] == 30  # fill's own default guidance


def check_controlnet(run: Run) -> None:
    body = run.value
    completed(body, "controlnet", (64, 64))
    assert body["controlnet_type"] == "canny" and body["model_id"] == "flux1-canny-dev"


def check_redux(run: Run) -> None:
    meta = completed(run.value, "redux", (64, 64))
    assert meta["model_id"] == "flux1-redux-dev" and meta["prompt"] == ""


def check_lora(run: Run) -> None:
    [lora] = run.value
    assert lora["name"].endswith(".safetensors") and lora["weight"] == 0.8


def check_async_prefer(run: Run) -> None:
    head, _, body = run.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.split("\n", 1)[0].split()[1] == "202", head
    task = json.loads(body)
    assert task["success"] is True and task["status"] == "queued"
    assert f"location: /task/{task['task_id']}" in head.lower(), head


def check_upload_text2img(run: Run) -> None:
    assert completed(run.value, "text2img", (64, 64))["prompt"] == "a lighthouse on a cliff at dawn"


def check_upload_img2img(run: Run) -> None:
    completed(run.value, "img2img", INPUT_SIZE)


def check_upload_fill(run: Run) -> None:
    completed(run.value, "fill", (64, 64))


def check_upload_controlnet(run: Run) -> None:
    body = run.value
    completed(body, "controlnet", (64, 64))
    assert body["controlnet_type"] == "depth"


def check_upload_lora_async(run: Run) -> None:
    body = run.value
    assert body["success"] is True and body["status"] == "queued" and len(body["task_id"]) == 32


def check_task_poll(run: Run) -> None:
    completed(run.value, "text2img", (64, 64))
    assert png_size(run.cwd / "village.png") == (64, 64)


def check_task_cancel(run: Run) -> None:
    assert run.value == {"success": True, "status": "cancelled", "error_code": "cancelled",
                         "message": "task cancelled"}


def check_idempotency_replay(run: Run) -> None:
    body = run.value
    assert len(body["first"]) == 32 and body["again"] == body["first"] and body["replayed"] == "true", body


def check_idempotency_mismatch(run: Run) -> None:
    body, status = status_and_body(run)
    assert status == 422 and body["success"] is False and body["error"] == "Idempotency-Key reused"


def check_keys_list(run: Run) -> None:
    body = run.value
    names = {k["name"]: k for k in body["keys"]}
    assert {"docs-user", "docs-admin"} <= set(names) and body["total"] == len(body["keys"])
    assert names["docs-admin"]["source"] == "environment" and names["docs-admin"]["can_delete"] is False
    assert USER_KEY not in run.stdout and ADMIN_KEY not in run.stdout


def check_keys_create(run: Run) -> None:
    body = run.value
    assert body["success"] is True and body["name"] == "alice" and body["permissions"] == ["generation", "readonly"]
    key = body["api_key"]
    assert key.startswith("gs-") and body["config_string"] == f"{key}:alice:generation,readonly"
    assert body["key_id"] == f"{key[:8]}-{key[-4:]}"
    url = run.deployment.cluster.url
    assert requests.get(f"{url}/", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200


def check_keys_create_json(run: Run) -> None:
    body = run.value
    assert body["success"] is True and body["name"] == "dashboard" and body["permissions"] == ["readonly"]


def check_keys_update(run: Run) -> None:
    key = run.value["key"]
    assert run.value["success"] is True and key["name"] == "nightly-batch"
    assert (key["weight"], key["priority_floor"], key["source"]) == (0.25, 10, "file")


def deleted(run: Run, name: str, count: int = 1) -> None:
    """Assert a delete answer that removed `count` keys named `name`."""
    body = run.value
    assert body["success"] is True and [k["name"] for k in body["deleted_keys"]] == [name] * count, body


def check_keys_delete(run: Run) -> None:
    deleted(run, "temporary-build-bot")


def check_keys_delete_by_id(run: Run) -> None:
    deleted(run, "old-laptop")


def check_keys_delete_by_name(run: Run) -> None:
    deleted(run, "nightly-job", 2)


def check_keys_reload(run: Run) -> None:
    body = run.value
    assert body["success"] is True and body["total_keys"] >= 2


def error(run: Run, status: int, error_text: str, field: str | None = None) -> dict[str, Any]:
    """Assert an error answer printed with its status; returns the body."""
    body, got = status_and_body(run)
    assert got == status and body["success"] is False and body["error"] == error_text, run.stdout
    if field is not None:
        assert body["field"] == field, body
    return body


def check_error_validation(run: Run) -> None:
    error(run, 422, "validation error", "cfg")


def check_error_unknown_model(run: Run) -> None:
    assert set(error(run, 400, "unknown model_id")["served"]) == MODEL_IDS


def check_error_unsupported_mode(run: Run) -> None:
    assert error(run, 422, "mode not supported by this model", "mode")["supported"] == ["text2img", "img2img"]


def check_error_task_not_found(run: Run) -> None:
    error(run, 404, "task not found")


def check_error_cancel_finished(run: Run) -> None:
    assert error(run, 409, "task already finished")["task_status"] == "completed"


def check_error_unsupported_media_type(run: Run) -> None:
    error(run, 415, "unsupported media type")


def check_error_header_too_large(run: Run) -> None:
    error(run, 431, "request header fields too large")


def check_robust_form_number(run: Run) -> None:
    error(run, 422, "validation error", "width")


def check_guide_batch_fixed(run: Run) -> None:
    assert run.stdout == ""
    for name in ("output_a_cute_kitten.png", "output_a_proud_lion.png"):
        assert png_size(run.cwd / name) == (64, 64)


CHECKS: dict[str, Callable[[Run], None]] = {
    "keys-update": check_keys_update,
    "auth-x-api-key": check_root,
    "auth-errors": check_auth_errors,
    "retry-after": check_retry_after,
    "root": check_root,
    "task-image": check_task_image,
    "task-events": check_task_events,
    "ui-page": check_ui_page,
    "ui-asset": check_ui_asset,
    "metrics": check_metrics,
    "metrics-cluster": check_metrics_cluster,
    "webhook-submit": check_webhook_submit,
    "task-list": check_task_list,
    "openapi": check_openapi,
    "docs-page": check_docs_page,
    "health": check_health,
    "status": check_status,
    "models": check_models,
    "loras": check_loras,
    "generate-text2img": check_text2img,
    "generate-size-rounding": check_size_rounding,
    "generate-img2img": check_img2img,
    "generate-fill": check_fill,
    "generate-controlnet": check_controlnet,
    "generate-redux": check_redux,
    "generate-lora": check_lora,
    "generate-async": check_async_prefer,
    "upload-text2img": check_upload_text2img,
    "upload-img2img": check_upload_img2img,
    "upload-fill": check_upload_fill,
    "upload-controlnet": check_upload_controlnet,
    "upload-lora-async": check_upload_lora_async,
    "task-poll": check_task_poll,
    "task-cancel": check_task_cancel,
    "idempotency-replay": check_idempotency_replay,
    "idempotency-mismatch": check_idempotency_mismatch,
    "keys-list": check_keys_list,
    "keys-create": check_keys_create,
    "keys-create-json": check_keys_create_json,
    "keys-delete": check_keys_delete,
    "keys-delete-by-id": check_keys_delete_by_id,
    "keys-delete-by-name": check_keys_delete_by_name,
    "keys-reload": check_keys_reload,
    "error-validation": check_error_validation,
    "error-unknown-model": check_error_unknown_model,
    "error-unsupported-mode": check_error_unsupported_mode,
    "error-task-not-found": check_error_task_not_found,
    "error-cancel-finished": check_error_cancel_finished,
    "error-unsupported-media-type": check_error_unsupported_media_type,
    "error-header-too-large": check_error_header_too_large,
    "robust-form-number": check_robust_form_number,
    "guide-batch-fixed": check_guide_batch_fixed,
}


# ---- the tests --------------------------------------------------------------------------

def registered_routes() -> list[tuple[str, str]]:
    """(METHOD, path template) for every responder the front's app defines itself."""
    from http_front.app import create_app
    from http_front.keys import KeyStore

    app = create_app(None, KeyStore.from_env([], None))  # no broker: nothing is opened
    routes: list[tuple[str, str]] = []

    def walk(nodes: list[Any]) -> None:
        for node in nodes:
            if node.resource is not None:
                for method, responder in node.method_map.items():
                    if getattr(responder, "__self__", None) is node.resource:  # not Falcon's defaults
                        routes.append((method, node.uri_template))
            walk(node.children)

    walk(app._router._roots)
    return routes


def test_examples_have_unique_names_and_each_has_a_check() -> None:
    names = [e.name for e in EXAMPLES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert set(names) == set(CHECKS), {"without a check": sorted(set(names) - set(CHECKS)),
                                       "check without an example": sorted(set(CHECKS) - set(names))}


def undocumented(text: str, routes: list[tuple[str, str]]) -> list[str]:
    """Routes without a ``METHOD /path`` heading, or without an example calling them under it."""
    sections = {s.title: s for s in doc_sections(text)}
    examples = doc_examples(text)
    problems: list[str] = []
    for method, path in routes:
        title = f"{method} {path}"
        section = sections.get(title)
        if section is None:
            problems.append(f"{title}: no heading")
            continue
        inside = [e for e in examples if section.start < e.line - 1 < section.end]
        if not any(method in methods_of(e.code, path) for e in inside):
            problems.append(f"{title}: no example calling it under its heading")
    return problems


def methods_of(code: str, path: str) -> set[str]:
    """The HTTP methods with which the example's curl commands call `path`.

    A template's parameters match anything: ``/task/{task_id}`` matches ``/task/$TASK_ID``.
    """
    pattern = re.compile("[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]*\}", path)))
    methods: set[str] = set()
    for command in re.split(r"\n(?!\s)|\|", code.replace("\\\n", " ")):
        if "curl" not in command:
            continue
        target = re.search(r"\$GENSERVE_URL(/[^\"'\s]*)", command)
        if target is None or not pattern.fullmatch(target.group(1).split("?")[0]):
            continue
        explicit = re.search(r"-X\s+([A-Z]+)", command)
        if explicit:
            methods.add(explicit.group(1))
        else:
            methods.add("POST" if re.search(r"\s(-d|-F|--data\S*)\s", command) else "GET")
    return methods


def test_every_route_has_a_heading_and_an_example() -> None:
    routes = registered_routes()
    assert len(routes) >= 15, routes  # 14 paths; /task/{task_id} has GET and DELETE
    assert undocumented(DOC_TEXT, routes) == []


def test_the_route_check_notices_a_missing_heading_or_example() -> None:
    routes = registered_routes()
    assert undocumented(DOC_TEXT.replace("### GET /health", "### Health"), routes) == ["GET /health: no heading"]
    without = DOC_TEXT.replace("# example: task-cancel", "# (not run)")
    assert undocumented(without, routes) == ["DELETE /task/{task_id}: no example calling it under its heading"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs_as_written(deployment: Deployment, example: Example) -> None:
    run = run_example(example, deployment)
    CHECKS[example.name](run)
