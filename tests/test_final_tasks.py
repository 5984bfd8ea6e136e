"""The front keeps finished tasks for a second (http_front.final_tasks): units, then the Falcon app."""

from __future__ import annotations

from pathlib import Path

from genserve import wire as w
from http_front.final_tasks import FinalTasks
from http_front.keys import KeyStore
from tests.conftest import DEFAULT_KEY, Stack, wait_until
from tests.fakes import params

OTHER = "other-key-0123456789abcdef0123456789ab"


def view(task_id: str, status: str = w.COMPLETED) -> w.TaskView:
    return w.TaskView(task_id=task_id, status=status, model_id="flux1-dev", mode="text2img", priority=0,
                      owner="k", params=params(), created_at=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_finished_task_is_kept_for_its_age_and_a_running_one_never() -> None:
    clock = Clock()
    kept = FinalTasks(max_age=1.0, clock=clock)
    kept.put(view("done"), b"png", fetched=True)
    kept.put(view("busy", w.RUNNING), None, fetched=True)
    assert kept.get("done", fetch=True) == (view("done"), b"png")
    assert kept.get("done", fetch=False) == (view("done"), None)
    assert kept.get("busy", fetch=False) is None
    clock.now = 1.5
    assert kept.get("done", fetch=True) is None  # too old: asked again


def test_a_view_kept_without_its_image_does_not_answer_a_fetch() -> None:
    kept = FinalTasks()
    kept.put(view("done"), None, fetched=False)  # from a status request
    assert kept.get("done", fetch=True) is None and kept.get("done", fetch=False) is not None


def test_the_byte_budget_drops_the_oldest_and_refuses_huge_images() -> None:
    kept = FinalTasks(max_bytes=800)
    for i in range(9):
        kept.put(view(f"t{i}"), b"x" * 100, fetched=True)
    assert kept.get("t0", fetch=True) is None and kept.get("t8", fetch=True) is not None
    kept.put(view("huge"), b"x" * 101, fetched=True)  # over an eighth of the budget
    assert kept.get("huge", fetch=True) is None


def test_polls_of_a_finished_task_skip_the_broker_and_other_keys_still_get_404(
        tmp_path: Path, tiny_models: Path) -> None:
    keys = KeyStore.from_env([(OTHER, "other", ("generation",))], DEFAULT_KEY)
    stack = Stack(tmp_path / "broker", tiny_models, ("flux1-dev",), keys=keys)
    try:
        r = stack.http.simulate_post("/generate", json={"prompt": "x", "width": 64, "height": 64,
                                                        "num_inference_steps": 2, "async": True})
        task_id = r.json["task_id"]
        wait_until(lambda: stack.http.simulate_get(f"/task/{task_id}").json["status"] == "completed", 30)
        services = stack.app._router.find(f"/task/{task_id}")[0].services
        asked: list[str] = []
        real = services.broker.request

        def counting(msg, *args, **kwargs):
            asked.append(type(msg).__name__)
            return real(msg, *args, **kwargs)

        services.broker.request = counting
        polls = [stack.http.simulate_get(f"/task/{task_id}") for _ in range(5)]
        assert all(p.status_code == 200 and p.json == polls[0].json for p in polls)
        assert asked.count("Fetch") <= 1  # at most once a second, not once per poll
        other = stack.http.simulate_get(f"/task/{task_id}", headers={"Authorization": f"Bearer {OTHER}"})
        assert other.status_code == 404  # kept by the front, still not this key's task
    finally:
        stack.close()
