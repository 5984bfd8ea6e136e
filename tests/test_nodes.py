"""The node registry, without sockets."""

from __future__ import annotations

from typing import Any

from broker.nodes import BUSY, NodeRegistry
from genserve import wire as w


def ready(node_id: str, models: dict[str, list[str]], **extra: Any) -> w.Ready:
    """A READY header as a node would send it."""
    return w.Ready(node_id=node_id, device="cuda:0", host="h", pid=1, models=models, **extra)


def test_register_touch_expire_and_served_models() -> None:
    reg = NodeRegistry()
    a = reg.register(b"a", ready("gpu0", {"flux1-dev": ["text2img", "img2img"]}, loaded=["flux1-dev"]), now=0.0)
    reg.register(b"b", ready("gpu1", {"flux1-dev": ["text2img"], "flux1-fill-dev": ["fill"]}), now=0.0)
    assert len(reg) == 2 and reg.find("gpu1").identity == b"b"
    served = reg.served_models()
    assert served["flux1-dev"] == w.ServedModel(["img2img", "text2img"], ["gpu0", "gpu1"], ["gpu0"])
    assert served["flux1-fill-dev"].nodes == ["gpu1"]
    assert reg.serves("flux1-dev", "img2img") and reg.serves("flux1-fill-dev", "fill")
    assert not reg.serves("flux1-fill-dev", "text2img") and not reg.serves("flux1-redux-dev", "redux")
    reg.touch(b"a", now=5.0)
    assert [n.node_id for n in reg.expired(now=5.5, timeout=3.0)] == ["gpu1"]
    a.state = BUSY
    assert [n.node_id for n in reg.available()] == ["gpu1"]
    reg.find("gpu1").draining = True
    assert reg.available() == []
    assert reg.remove(b"a") is a and reg.get(b"a") is None


def test_re_register_keeps_drain_flag() -> None:
    reg = NodeRegistry()
    reg.register(b"a", ready("n", {}), now=0.0).draining = True
    assert reg.register(b"a", ready("n", {}), now=1.0).draining
