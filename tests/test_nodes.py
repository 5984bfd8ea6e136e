"""The node registry, without sockets."""

from __future__ import annotations

from broker.nodes import BUSY, NodeRegistry


def test_register_touch_expire_and_served_models() -> None:
    reg = NodeRegistry()
    a = reg.register(b"a", {"node_id": "gpu0", "device": "cuda:0", "loaded": ["flux1-dev"],
                            "models": {"flux1-dev": ["text2img", "img2img"]}}, now=0.0)
    reg.register(b"b", {"node_id": "gpu1", "device": "cuda:1",
                        "models": {"flux1-dev": ["text2img"], "flux1-fill-dev": ["fill"]}}, now=0.0)
    assert len(reg) == 2 and reg.find("gpu1").identity == b"b"
    served = reg.served_models()
    assert served["flux1-dev"] == {"modes": ["img2img", "text2img"], "nodes": ["gpu0", "gpu1"], "loaded_on": ["gpu0"]}
    assert served["flux1-fill-dev"]["nodes"] == ["gpu1"]
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
    reg.register(b"a", {"node_id": "n", "models": {}}, now=0.0).draining = True
    assert reg.register(b"a", {"node_id": "n", "models": {}}, now=1.0).draining
