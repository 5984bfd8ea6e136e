"""Schemathesis fuzzes the front through its own /openapi.json, in process (WSGI).

Every operation gets generated requests, valid and invalid, with keys of each permission
(generation, readonly, admin), against a fake broker that answers as the real one does
without queueing anything (no broker, node or model). A run passes when no response is a
5xx other than the documented 503 (no node serves the model) and 504 (the task timed out),
every response matches the status, content type, headers and schema the document gives
it, and every error body is JSON.

`make test` runs GENSERVE_FUZZ_EXAMPLES (default 50) fuzzed examples per operation plus
schemathesis's examples and coverage phases, about two thousand requests in some 10 s, with
a fixed seed; `make fuzz` runs 500 per operation with a new seed (GENSERVE_FUZZ_SEED to
replay one). Half the generation bodies get a prompt and valid images (a hook below) so that
fuzzing reaches the broker, not only the validator.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import CheckContext
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from genserve import catalog
from genserve import errors as e
from genserve import wire as w
from genserve.keyfile import KeyFile, make_fernet
from genserve.spec import TaskSpec
from http_front.app import create_app
from http_front.broker_client import BrokerError
from http_front.config import FrontConfig
from http_front.keys import DEFAULT_KEY, KeyStore, owner_of
from http_front.ratelimit import SlidingWindowLimiter

FUZZ_EXAMPLES = int(os.environ.get("GENSERVE_FUZZ_EXAMPLES", "50"))
FUZZ_SEED = os.environ.get("GENSERVE_FUZZ_SEED", "20240611")  # "": a new seed each run (make fuzz)
GENERATION = "fuzz-generation-key-0123456789abcdef"
READONLY = "fuzz-readonly-key-0123456789abcdefgh"
ADMIN = "fuzz-admin-key-0123456789abcdefghijkl"
KEYS = (GENERATION, READONLY, ADMIN)
SERVED = tuple(m for m in catalog.MODEL_IDS if m != "flux1-openpose-dev")  # openpose: 503, no node
ALLOWED_5XX = frozenset({503, 504})


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
LORA_REQUEST = [{"name": "cute_cat_lora", "weight": 0.5}, {"name": "styles/watercolor.safetensors"}]
# As nodes report them; the second one with the defaults (0 MB, "root"), which /loras must still spell out.
LORAS = [w.LoraInfo("styles/watercolor.safetensors", 0.1, "styles"), w.LoraInfo("cute_cat_lora.safetensors")]


class FuzzBroker:
    """Stands in for BrokerClient: answers like the broker, keeps tasks in memory, runs nothing.

    A submitted task ends at once: completed with a PNG or, chosen by a hash of its spec,
    failed with a timeout (504), cancelled (409) or refused for want of a node (503).
    Unknown task ids are found half the time, as tasks of another key, so GET and DELETE
    /task/{task_id} reach their 200 answers for admin keys.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, w.TaskView] = {}
        self.submitted: list[tuple[str, TaskSpec]] = []  # (owner, spec) of every SUBMIT
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.event_listeners: list[Any] = []  # tasks end at once: no EVENT is ever pushed

    def post(self, header: Any) -> None:
        """The BrokerClient.post contract (fire and forget)."""
        w.encode(header)

    @staticmethod
    def _reply(body: Any) -> w.Message:
        return w.Message(w.REPLY, w.Reply(0, time.time(), body))

    def request(self, header: Any, blobs: Any = (), timeout: float | None = None) -> w.Message:
        """The BrokerClient.request contract."""
        w.encode(header, blobs)  # what the real client does first: raises if the front built a bad message
        if isinstance(header, w.Submit):
            return self._submit(header, list(blobs))
        if isinstance(header, w.InfoRequest):
            return self._reply(self._info())
        if isinstance(header, w.ListTasks):
            with self._lock:
                tasks = [t for t in reversed(self.tasks.values()) if header.owner in (None, t.owner)
                         and header.status in (None, t.status)][:header.limit]
            return self._reply(w.TaskListBody(tasks, None))
        if isinstance(header, w.MetricsRequest):
            return w.Message(w.REPLY, w.Reply(0, time.time(), w.MetricsBody("text/plain; version=0.0.4")),
                             [b"# HELP genserve_nodes Registered nodes by state\n"])
        if isinstance(header, w.Watch):
            # Only ended tasks: the TestClient reads a whole body, and a live stream never ends by itself.
            views = []
            for task_id in header.task_ids:
                try:
                    views.append(self._task(task_id))
                except BrokerError:
                    continue
            ended = [v for v in views if v.status in w.FINAL_STATES]
            return self._reply(w.WatchBody(ended, int(time.time() * 1000)))
        task = self._task(header.task_id)
        if isinstance(header, w.CancelTask) and task.status not in w.FINAL_STATES:
            task = msgspec.structs.replace(task, status=w.CANCELLED, error_code=e.CANCELLED, error="cancelled")
            with self._lock:
                self.tasks[task.task_id] = task
        blobs_out = [PNG] if isinstance(header, w.Fetch) and task.status == w.COMPLETED else []
        return w.Message(w.REPLY, w.Reply(0, time.time(), w.TaskBody(task)), blobs_out)

    def _submit(self, header: w.Submit, blobs: list[bytes]) -> w.Message:
        spec = msgspec.convert(msgspec.to_builtins(header.task), TaskSpec)  # strict, like the broker's decoder
        self.submitted.append((header.owner, spec))
        assert len(blobs) == len(header.images) and set(header.images) <= set(catalog.IMAGE_FIELDS)
        assert set(header.images) == set(catalog.REQUIRED_IMAGES[spec.mode]), (spec.mode, header.images)
        if spec.model_id not in catalog.MODEL_IDS:
            raise BrokerError(e.UNKNOWN_MODEL, f"unknown model_id {spec.model_id!r}", {"served": list(SERVED)})
        outcome = hashlib.sha256(msgspec.json.encode(spec)).digest()[0] % 6
        if spec.model_id not in SERVED or outcome == 2:  # 2: as if its last node had just left
            raise BrokerError(e.NO_NODE, f"no live node serves {spec.model_id}")
        now = time.time()
        task_id = f"{next(self._ids):032x}"
        status, code = {0: (w.FAILED, e.TIMEOUT), 1: (w.CANCELLED, e.CANCELLED)}.get(outcome, (w.COMPLETED, None))
        meta = w.ResultMeta(0.01, spec.params.width, spec.params.height, spec.params.seed,
                            spec.params.num_inference_steps, "fake", spec.params.cfg)
        task = w.TaskView(task_id, status, spec.model_id, spec.mode, spec.priority, header.owner, spec.params,
                          now, 1, now, now, "n1", error_code=code, error=code,
                          meta=meta if status == w.COMPLETED else None)
        with self._lock:
            self.tasks[task_id] = task
        return w.Message(w.ACK, w.Ack(0, now, task_id, 0))

    def _task(self, task_id: str) -> w.TaskView:
        with self._lock:
            task = self.tasks.get(task_id)
        if task is not None:
            return task
        digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).digest()
        if digest[0] % 2:
            raise BrokerError(e.NOT_FOUND, "task not found")
        status = (w.QUEUED, w.RUNNING, w.COMPLETED, w.FAILED, w.CANCELLED)[digest[1] % 5]
        params = msgspec.convert({"prompt": "x", "width": 16, "height": 16, "num_inference_steps": 2, "seed": 1,
                                  "cfg": 3.5, "strength": 0.8}, w.GenerationParams)
        return w.TaskView(task_id, status, "flux1-dev", "text2img", 0, "someone-else", params, 1.0,
                          queue_position=3 if status == w.QUEUED else None,
                          progress=w.Progress(1, 2) if status == w.RUNNING else None,
                          error_code=e.GENERATION if status == w.FAILED else None,
                          meta=w.ResultMeta(0.5, 16, 16, 1, 2, "cpu") if status == w.COMPLETED else None,
                          result_expired=status == w.COMPLETED and digest[2] % 2 == 0)

    def _info(self) -> w.InfoBody:
        node = w.NodeView("n1", "cpu", "host", 1, "busy", False, "someone-elses-task",
                          {m: list(catalog.MODEL_MODES[m]) for m in SERVED}, ["flux1-dev"], LORAS,
                          1 << 30, 1 << 29, 0.1, 3)
        models = {m: w.ServedModel(sorted(catalog.MODEL_MODES[m]), ["n1"], ["n1"] if m == "flux1-dev" else [])
                  for m in SERVED}
        return w.InfoBody([node], models, w.QueueView(0, {}), {"completed": len(self.tasks)}, time.time())

    def watch(self, task_id: str) -> Future:
        """A Future already holding the task's DONE."""
        future: Future = Future()
        future.set_result(w.Message(w.DONE, w.Done(self._task(task_id)), [PNG]))
        return future

    def unwatch(self, task_id: str, future: Future) -> None:
        """Nothing to forget."""


def build() -> tuple[Any, FuzzBroker]:
    """The app with the fake broker, one key of each permission and a key file in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="genserve-fuzz-"))
    atexit.register(shutil.rmtree, folder, True)
    keyfile = KeyFile(folder / "api_keys.enc", make_fernet(Fernet.generate_key().decode(), DEFAULT_KEY))
    keys = KeyStore.from_env([(GENERATION, "gen", ("generation",)), (READONLY, "ro", ("readonly",)),
                              (ADMIN, "admin", ("admin",))], None, keyfile)
    broker = FuzzBroker()
    unlimited = 10**9  # rate limits and the failed-auth throttle have their own tests
    app = create_app(broker, keys, FrontConfig(), limiter=SlidingWindowLimiter(unlimited, 60),
                     failures=SlidingWindowLimiter(unlimited, 60))
    return app, broker


class Tally:
    """WSGI middleware counting answers by (method, route, status), for the summary test."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: Counter[tuple[str, str, int]] = Counter()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        """Pass the request on; count its status."""
        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            route = environ.get("PATH_INFO", "")
            if route.startswith("/task/"):
                tail = route.rsplit("/", 1)[1] if route.count("/") == 3 else ""
                route = f"/task/{{task_id}}/{tail}" if tail in ("image", "events") else "/task/{task_id}"
            elif route.startswith("/ui/"):
                route = "/ui/{name}"
            self.counts[(environ["REQUEST_METHOD"], route, int(status[:3]))] += 1
            return start_response(status, headers, exc_info)
        return self.app(environ, start)


APP, BROKER = build()
TALLY = Tally(APP)
schema = schemathesis.openapi.from_wsgi("/openapi.json", TALLY)
schema.config.generation.update(max_examples=FUZZ_EXAMPLES)
if FUZZ_SEED:
    schema.config.seed = int(FUZZ_SEED)


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    """Generation bodies also come with a prompt, the images their mode needs and known LoRAs.

    Without this, few generated bodies would pass validation and reach the broker; each
    variant keeps every other generated field (and so still meets mismatches and limits).
    """
    label = context.operation.label if context.operation is not None else ""
    fields = getattr(body, "body", body)  # multipart bodies come wrapped with their parts' content types
    if label not in ("POST /generate", "POST /generate/upload") or not isinstance(fields, dict):
        return st.just(body)
    mode = fields.get("mode", catalog.DEFAULT_MODE)
    if mode not in catalog.MODES:
        return st.just(body)
    deep = dict(fields)
    if not isinstance(deep.get("prompt"), str) or not deep["prompt"].strip():
        deep["prompt"] = "一只可爱的小猫"
    upload = label.endswith("upload")
    for name in catalog.REQUIRED_IMAGES[mode]:
        deep[name] = PNG if upload else PNG_URI
    if "loras" in deep:
        deep["loras"] = json.dumps(LORA_REQUEST) if upload else LORA_REQUEST
    implied = {k: v for k, v in deep.items() if k != "model_id"}  # the mode's default model
    variants = [deep, implied, {**deep, "async": True}]
    if fields is not body:
        variants = [dataclasses.replace(body, body=v) for v in variants]
    return st.sampled_from([*variants, body])


def only_documented_server_errors(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """No 5xx but 503 (no node) and 504 (timeout)."""
    if response.status_code >= 500 and response.status_code not in ALLOWED_5XX:
        raise Failure(operation=case.operation.label, title="Undocumented server error",
                      message=f"{response.status_code}: {response.content[:500]!r}")
    return None


def errors_are_json(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx body is a JSON object with a `detail` string."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("detail"), str):
        raise Failure(operation=case.operation.label, title="Error body is not JSON with a detail",
                      message=f"{response.status_code}: {response.content[:500]!r}")
    return None


CHECKS = [only_documented_server_errors, errors_are_json, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, ignored_auth, missing_required_header,
          unsupported_method]


def key_for(case: Any) -> str:
    """One of KEYS, chosen by the case's content, so that a failing case replays with the same key."""
    seen = repr((case.method, case.path_parameters, case.query, case.headers, case.body)).encode("utf-8", "replace")
    return KEYS[hashlib.sha256(seen).digest()[0] % len(KEYS)]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)  # no replay: the seed decides
def test_every_operation_answers_as_documented(case: Any) -> None:
    try:
        case.call_and_validate(headers={"Authorization": f"Bearer {key_for(case)}"}, checks=CHECKS)
    except AssertionError as exc:  # schemathesis's failures are AssertionErrors
        exc.add_note(f"reproduce with GENSERVE_FUZZ_SEED={schema.config.seed} "
                     f"GENSERVE_FUZZ_EXAMPLES={FUZZ_EXAMPLES}")
        raise


def test_fuzzing_reached_every_operation_and_the_success_paths() -> None:
    # Runs after the fuzz tests (file order) and reads what they sent, so only after all of them.
    answered = {(method, route) for method, route, _ in TALLY.counts}
    documented = {(method.upper(), path) for path, methods in schema.raw_schema["paths"].items() for method in methods}
    if not documented <= answered:
        pytest.skip("needs every fuzz test to have run first (the whole module)")
    succeeded = {(method, route) for method, route, status in TALLY.counts if status < 300}
    for method, route in (("POST", "/generate"), ("POST", "/generate/upload"), ("GET", "/task/{task_id}"),
                          ("GET", "/tasks"), ("GET", "/metrics"),
                          ("GET", "/metrics/cluster"), ("GET", "/ui"),
                          ("POST", "/auth/generate-key"), ("GET", "/status"), ("GET", "/docs")):
        assert (method, route) in succeeded, (method, route, sorted(succeeded))
    assert {owner for owner, _ in BROKER.submitted} <= {owner_of(GENERATION), owner_of(ADMIN)}
