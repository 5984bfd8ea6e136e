"""Unit: /health and /models bodies are rendered once per INFO snapshot; answers are compact UTF-8 JSON."""

from __future__ import annotations

import json

from genserve import wire as w
from genserve.views import NodeView, QueueView, ServedModel
from http_front.resources.info import Health, Models, PerSnapshot


def snapshot(nodes: int) -> w.InfoBody:
    """An INFO body with `nodes` idle nodes serving flux1-dev and three queued tasks."""
    ids = [f"n{i}" for i in range(nodes)]
    views = [NodeView(node_id=n, device="cpu", host="h", pid=1, state="idle", draining=False, task_id=None,
                      models={"flux1-dev": ["text2img"]}, loaded=[], loras=[], memory_total=0, memory_free=0,
                      last_heartbeat_age_s=0.0, jobs_done=0) for n in ids]
    models = {"flux1-dev": ServedModel(modes=["text2img"], nodes=ids, loaded_on=[])} if nodes else {}
    return w.InfoBody(nodes=views, models=models, queue=QueueView(length=3, by_model={}), tasks={}, time=0.0)


def test_one_render_per_snapshot_and_a_new_one_when_it_changes() -> None:
    calls = []

    def render(info: w.InfoBody) -> dict:
        calls.append(info)
        return {"nodes": len(info.nodes)}

    cache = PerSnapshot(render)
    first, second = snapshot(1), snapshot(2)
    assert cache(first) is cache(first) and len(calls) == 1
    assert json.loads(cache(second)) == {"nodes": 2} and len(calls) == 2
    assert json.loads(cache(first)) == {"nodes": 1}  # an older snapshot again: rendered again, never stale


def test_health_and_models_bodies_follow_the_snapshot() -> None:
    assert Health.render(snapshot(0)) == {"status": "unhealthy", "broker": "ok", "nodes": 0, "queue_length": 3,
                                          "reason": "no GPU node is registered"}
    assert Health.render(snapshot(2))["status"] == "healthy"
    assert Models.render(snapshot(0))["total"] == 0
    served = Models.render(snapshot(1))["models"]
    assert [m["model_id"] for m in served] == ["flux1-dev"] and served[0]["nodes"] == ["n0"]


def test_answers_are_compact_utf8_json_and_never_nan() -> None:
    import falcon
    from falcon import testing

    from http_front.app import create_app
    from http_front.auth import MISSING_KEY
    from http_front.keys import KeyStore

    app = create_app(None, KeyStore.from_env([], None))  # no broker: nothing is opened
    r = testing.TestClient(app).simulate_get("/health")  # no key: 401 with a Chinese detail
    assert r.status_code == 401 and r.json == {"detail": MISSING_KEY}
    assert MISSING_KEY.encode() in r.content and b"\\u" not in r.content and b'{"detail":"' in r.content
    handler = app.resp_options.media_handlers[falcon.MEDIA_JSON]
    assert handler.serialize({"x": float("nan"), "y": float("inf")}, falcon.MEDIA_JSON) == b'{"x":null,"y":null}'


def test_a_lone_surrogate_that_reaches_an_answer_goes_out_replaced_not_as_a_500() -> None:
    from http_front.jsonout import dumps

    out = dumps({"detail": "x\ud800y", "\udfff": ["\ud83d", 1.5, float("nan")]})
    assert json.loads(out) == {"detail": "x\ufffdy", "\ufffd": ["\ufffd", 1.5, None]}
