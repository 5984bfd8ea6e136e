"""`genservectl`: the operator's command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import msgspec
import zmq

from genserve import wire as w
from genserve.catalog import MODEL_IDS
from genservectl.keys import crypto_key
from genservectl.keys import keys as keys_group
from genservectl.tasks import generate, tasks_group


def broker_request(endpoint: str, header: Any, timeout: float = 2.0,
                   curve: tuple[str | None, str | None] = (None, None)) -> w.Message:
    """One request/reply with the broker's frontend; raises click.ClickException on failure."""
    from genserve.curve import setup_client

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        setup_client(sock, Path(curve[0]) if curve[0] else None, Path(curve[1]) if curve[1] else None)
        sock.connect(endpoint)
        sock.send_multipart(w.encode(header))
        if not sock.poll(int(timeout * 1000)):
            raise click.ClickException(f"the broker at {endpoint} did not answer within {timeout:g}s")
        msg = w.decode(sock.recv_multipart())
    except w.ProtocolError as exc:
        raise click.ClickException(f"the broker at {endpoint} answered something else: {exc}") from None
    finally:
        sock.close(linger=0)
    if msg.command == w.FAIL:
        raise click.ClickException(f"broker refused: {msg.header.message}")
    return msg


broker_option = click.option("--broker", envvar="GENSERVE_BROKER_URL", default="tcp://127.0.0.1:5555",
                             show_default=True, help="broker frontend endpoint (env GENSERVE_BROKER_URL)")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
curve_options = [
    click.option("--curve-secret", envvar="GENSERVE_CURVE_SECRET", default=None, help="client secret key file"),
    click.option("--curve-server", envvar="GENSERVE_CURVE_SERVER", default=None, help="broker public key file"),
]


def with_curve(f):
    """Add the CURVE client options to a command."""
    for option in reversed(curve_options):
        f = option(f)
    return f


@click.group()
def cli() -> None:
    """Operate a GenServe deployment: models, nodes, keys."""


@cli.group()
def models() -> None:
    """Model folders."""


@models.command("build-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="weights are deterministic for a seed")
@click.option("--model", "model_ids", multiple=True, type=click.Choice(MODEL_IDS),
              help="only these model ids (default: all six)")
@click.option("--no-loras", is_flag=True, help="skip the sample LoRAs")
def build_tiny(directory: Path, seed: int, model_ids: tuple[str, ...], no_loras: bool) -> None:
    """Write tiny random-weight diffusers folders (real classes) for the demo and tests.

    Building needs torch, so the node's own entry (`genserve-build-tiny`) does the work.
    """
    args = [str(Path(sys.executable).parent / "genserve-build-tiny"), str(directory), "--seed", str(seed)]
    for model_id in model_ids:
        args += ["--model", model_id]
    if no_loras:
        args.append("--no-loras")
    sys.exit(subprocess.run(args).returncode)


def _print_nodes(info: w.InfoBody) -> None:
    nodes = msgspec.to_builtins(info.nodes)
    click.echo(f"queue: {info.queue.length} waiting  tasks: {info.tasks}")
    if not nodes:
        click.echo("no nodes registered")
        return
    rows = [("NODE", "HOST", "DEVICE", "STATE", "TASK", "NEXT", "LOADED", "MEM FREE", "HEARTBEAT")]
    for n in nodes:
        rows.append((n["node_id"], n["host"], n["device"], n["state"], n["task_id"] or "-", n["next_task_id"] or "-",
                     ",".join(n["loaded"]) or "-", f"{n['memory_free'] / 2**30:.1f}G",
                     f"{n['last_heartbeat_age_s']:.1f}s ago"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


@cli.command("status")
@broker_option
@json_option
@with_curve
def status(broker: str, as_json: bool, curve_secret: str | None, curve_server: str | None) -> None:
    """Queue and nodes as the broker sees them (exit 1 if it does not answer)."""
    info = broker_request(broker, w.InfoRequest(1), curve=(curve_secret, curve_server)).header.body
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(info), indent=2, ensure_ascii=False))
    else:
        _print_nodes(info)


@cli.command("nodes")
@broker_option
@json_option
@with_curve
def nodes(broker: str, as_json: bool, curve_secret: str | None, curve_server: str | None) -> None:
    """Registered nodes: address, device, memory, loaded models, task, heartbeat."""
    info = broker_request(broker, w.InfoRequest(1), curve=(curve_secret, curve_server)).header.body
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(info.nodes), indent=2, ensure_ascii=False))
    else:
        _print_nodes(info)


def _admin(action: str, broker: str, node: str, curve: tuple[str | None, str | None]) -> None:
    view = broker_request(broker, w.Admin(1, action, node), curve=curve).header.body.node
    click.echo(f"{view.node_id}: {view.state}")


@cli.command("drain")
@click.argument("node")
@broker_option
@with_curve
def drain(node: str, broker: str, curve_secret: str | None, curve_server: str | None) -> None:
    """Let NODE finish its task and give it no new one."""
    _admin("drain", broker, node, (curve_secret, curve_server))


@cli.command("undrain")
@click.argument("node")
@broker_option
@with_curve
def undrain(node: str, broker: str, curve_secret: str | None, curve_server: str | None) -> None:
    """Give NODE work again."""
    _admin("undrain", broker, node, (curve_secret, curve_server))


@cli.command("webhook-secret")
@click.option("--data-dir", envvar="GENSERVE_DATA_DIR", default="var/broker", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="the broker's data dir (env GENSERVE_DATA_DIR)")
def webhook_secret(data_dir: Path) -> None:
    """Print the "whsec_..." secret that signs webhooks, which receivers verify deliveries with.

    The broker generates it on its first start unless GENSERVE_WEBHOOK_SECRET sets one.
    """
    path = data_dir / "webhook_secret"  # broker.hooks.SECRET_FILE
    try:
        click.echo(path.read_text().strip())
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror} (has the broker started with this"
                                   " data dir, or is the secret set by GENSERVE_WEBHOOK_SECRET?)") from None


@cli.command("curve-keypair")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
def curve_keypair(directory: Path, name: str) -> None:
    """Create NAME.key (public, copy to the broker's authorised dir) and NAME.key_secret."""
    from genserve.curve import create_keypair

    public, secret = create_keypair(directory, name)
    click.echo(f"public: {public}\nsecret: {secret} (mode 0600; keep it on this machine)")


cli.add_command(keys_group)
cli.add_command(crypto_key)
cli.add_command(generate)
cli.add_command(tasks_group)


def main() -> None:
    """Entry point for `python -m genservectl`."""
    cli(prog_name="genservectl")


if __name__ == "__main__":
    sys.exit(main())
