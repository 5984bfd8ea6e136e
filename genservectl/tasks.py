"""`genservectl generate` and `genservectl tasks ...`: submit, follow, list and cancel tasks through a front."""

from __future__ import annotations

import base64
import http.client
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import click

from genservectl.keys import DEFAULT_URL, OPENER

FINAL = ("completed", "failed", "cancelled")
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
POLL_INTERVAL = 0.5
STREAM_TIMEOUT = 45.0  # the front sends a keep-alive comment every 15 s
HIDDEN = ("image", "image_base64")  # the image never goes to a terminal; /task/{id}/image serves it


class ApiError(click.ClickException):
    """An error answer from the front, with its HTTP status and the server's readable message."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.body = body if isinstance(body, dict) else {}


def server_message(body: Any, fallback: str) -> str:
    """The server's error body as one readable line: `error: detail` plus the fields it names."""
    if not isinstance(body, dict):
        return fallback
    parts = [str(body[k]) for k in ("error", "detail") if body.get(k)]
    text = ": ".join(dict.fromkeys(parts)) or fallback  # the two are often equal
    for name in ("field", "supported", "served", "task_status"):
        value = body.get(name)
        value = ", ".join(map(str, value)) if isinstance(value, list) else str(value or "")
        if value and value not in text:
            text += f" ({name.replace('_', ' ')}: {value})"
    return printable(text)


TASK_ID = re.compile(r"[0-9a-f]{32}")
FORMATS = ("png", "jpeg", "webp")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: Any) -> str:
    """Server text made safe for a terminal: control characters (escape sequences) removed."""
    return _CONTROL.sub("", str(text))


def checked_task_id(value: Any) -> str:
    """A task id from the server, refused unless it has the server's own form (it goes into paths)."""
    if not isinstance(value, str) or not TASK_ID.fullmatch(value):
        raise click.ClickException(f"the server answered an unexpected task id {printable(value)[:40]!r}")
    return value


def open_url(url: str, key: str, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, timeout: float = 30.0) -> Any:
    """Open one API request; raises ApiError with the server's message on an error status."""
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}", **(headers or {})})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        return OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                parsed = json.loads(exc.read().decode("utf-8"))
            except (ValueError, OSError):
                parsed = None
        raise ApiError(exc.code, server_message(parsed, str(exc.reason)), parsed) from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def api(url: str, key: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> dict[str, Any]:
    """One JSON API call; returns the decoded answer."""
    with open_url(url, key, method, path, body, timeout=timeout) as response:
        try:
            return json.loads(response.read().decode("utf-8"))
        except (ValueError, OSError) as exc:
            raise click.ClickException(f"bad answer from {url}{path}: {exc}") from None


def read_events(response: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from a text/event-stream response, read line by line."""
    event, data = "message", []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


class Display:
    """Queue position and step progress on stderr: a redrawn line on a terminal, plain lines otherwise."""

    def __init__(self, tty: bool, width: int = 30) -> None:
        self.tty, self.width = tty, width
        self.position: int | None = None
        self.node: str | None = None
        self.step: int | None = None
        self.last_line = 0.0
        self.open = False  # a redrawn line is on screen, not yet ended

    def _write(self, text: str, redraw: bool) -> None:
        text = printable(text)  # node ids and messages come from the server
        if self.tty and redraw:
            click.echo("\r" + text + "\x1b[K", err=True, nl=False)
            self.open = True
        else:
            self.close()
            click.echo(text, err=True)

    def close(self) -> None:
        """End a redrawn line, so that the next output starts on its own line."""
        if self.open:
            click.echo(err=True)
            self.open = False

    def update(self, data: dict[str, Any]) -> None:
        """Show what an event's data or a polled task body says about the task's progress."""
        status = data.get("status")
        if status == "queued":
            self.node = self.step = None  # also a task that went back to the queue
            position = data.get("queue_position")
            if position is not None and position != self.position:
                self.position = position
                self._write(f"queued: {position} ahead", redraw=True)
            return
        if status != "running":
            return
        node = data.get("node_id")
        if node and node != self.node:
            self.node, self.position, self.step = node, None, None
            self._write(f"running on {node}", redraw=False)
        progress = data.get("progress") or data
        step, total = progress.get("step"), progress.get("total")
        if isinstance(step, int) and isinstance(total, int) and total > 0 and step != self.step:
            self.step = step
            if self.tty:
                done = min(self.width, self.width * step // total)
                self._write(f"[{'#' * done}{'.' * (self.width - done)}] {step}/{total}", redraw=True)
            elif step >= total or time.monotonic() - self.last_line >= 1.0:  # log-friendly: about one a second
                self.last_line = time.monotonic()
                self._write(f"step {step}/{total}", redraw=False)


def follow_stream(url: str, key: str, task_id: str, display: Display) -> dict[str, Any] | None:
    """Follow the task's event stream to its final event; None when the stream is refused or drops."""
    try:
        response = open_url(url, key, "GET", f"/task/{task_id}/events", headers={"Accept": "text/event-stream"},
                            timeout=STREAM_TIMEOUT)
    except ApiError as exc:
        if exc.status == 429 or exc.status >= 500:
            return None
        raise
    except click.ClickException:
        return None
    with response:
        try:
            for event, data in read_events(response):
                if event in FINAL:
                    return data
                display.update(data)
        except (OSError, ValueError, http.client.HTTPException):
            pass  # a dropped stream: the caller polls
    return None


def poll(url: str, key: str, task_id: str, display: Display) -> dict[str, Any]:
    """Poll GET /task/{task_id} every half second until the task ends."""
    while True:
        body = api(url, key, "GET", f"/task/{task_id}")
        if body.get("status") in FINAL:
            return body
        display.update(body)
        time.sleep(POLL_INTERVAL)


def parse_lora(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[dict[str, Any]]:
    """NAME:WEIGHT specs -> the API's [{"name", "weight"}]."""
    loras = []
    for spec in values:
        name, sep, weight = spec.rpartition(":")
        if not sep or not name:
            raise click.BadParameter(f"{spec!r} is not NAME:WEIGHT (e.g. cute_cat_lora:0.8)", ctx, param)
        try:
            value = float(weight)
        except ValueError:
            raise click.BadParameter(f"the weight in {spec!r} is not a number", ctx, param) from None
        if not math.isfinite(value):
            raise click.BadParameter(f"the weight in {spec!r} is not a finite number", ctx, param)
        loras.append({"name": name, "weight": value})
    return loras


def read_image(ctx: click.Context, param: click.Parameter, value: Path | None) -> str | None:
    """An image file's bytes as base64, or a usage error if it cannot be read."""
    if value is None:
        return None
    try:
        data = value.read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}", ctx, param) from None
    if not data:
        raise click.BadParameter(f"{value} is empty", ctx, param)
    return base64.b64encode(data).decode("ascii")


url_option = click.option("--url", envvar="GENSERVE_URL", default=DEFAULT_URL, show_default=True,
                          help="front base URL (env GENSERVE_URL)")
key_option = click.option("--key", "api_key", envvar="GENSERVE_API_KEY", required=True,
                          help="an API key (env GENSERVE_API_KEY)")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")
image_path = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("generate")
@click.argument("prompt", required=False)
@click.option("--model", help="model id (default: the mode's model)")
@click.option("--mode", type=click.Choice(["text2img", "img2img", "fill", "controlnet", "redux"]))
@click.option("--width", type=int)
@click.option("--height", type=int)
@click.option("--steps", type=int, help="denoising steps")
@click.option("--cfg", type=float, help="guidance scale")
@click.option("--seed", type=int)
@click.option("--strength", type=float, help="img2img: how much changes (0 to 1)")
@click.option("--lora", "loras", multiple=True, metavar="NAME:WEIGHT", callback=parse_lora,
              help="apply a LoRA (repeatable)")
@click.option("--input-image", type=image_path, callback=read_image)
@click.option("--mask-image", type=image_path, callback=read_image)
@click.option("--control-image", type=image_path, callback=read_image)
@click.option("--controlnet-type", type=click.Choice(["depth", "canny", "openpose"]))
@click.option("--priority", type=int, help="lower runs first")
@click.option("--format", "output_format", type=click.Choice(["png", "jpeg", "webp"]))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="file (or folder) to write the image to (default: ./TASK_ID.FORMAT)")
@url_option
@key_option
@click.pass_context
def generate(ctx: click.Context, prompt: str | None, model: str | None, mode: str | None, width: int | None,
             height: int | None, steps: int | None, cfg: float | None, seed: int | None, strength: float | None,
             loras: list[dict[str, Any]], input_image: str | None, mask_image: str | None,
             control_image: str | None, controlnet_type: str | None, priority: int | None,
             output_format: str | None, output: Path | None, url: str, api_key: str) -> None:
    """Generate an image from PROMPT, follow its progress and save it; prints the file's path.

    Ctrl-C while waiting cancels the task (exit 130).
    """
    if output is not None and not output.is_dir() and not output.parent.is_dir():
        raise click.BadParameter(f"folder {output.parent} does not exist", ctx, param_hint="'-o' / '--output'")
    given = {"prompt": prompt, "model_id": model, "mode": mode, "width": width, "height": height,
             "num_inference_steps": steps, "cfg": cfg, "seed": seed, "strength": strength,
             "input_image": input_image, "mask_image": mask_image, "control_image": control_image,
             "controlnet_type": controlnet_type, "priority": priority, "output_format": output_format}
    body: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    if loras:
        body["loras"] = loras
    body["async"] = True
    try:
        task_id = checked_task_id(api(url, api_key, "POST", "/generate", body).get("task_id"))
    except KeyboardInterrupt:
        click.echo("interrupted while submitting; the task may have been accepted (see `genservectl tasks list`)",
                   err=True)
        ctx.exit(130)
    click.echo(f"task {task_id}", err=True)
    display = Display(sys.stderr.isatty())
    try:
        final = follow_stream(url, api_key, task_id, display) or poll(url, api_key, task_id, display)
        display.close()
        status = final.get("status")
        if status != "completed":
            code = f" ({final['error_code']})" if final.get("error_code") else ""
            reason = printable(final.get("error") or "no reason given")
            raise click.ClickException(f"task {task_id} {printable(status)}{printable(code)}: {reason}")
        with open_url(url, api_key, "GET", f"/task/{task_id}/image", timeout=60.0) as response:
            data = response.read()
    except KeyboardInterrupt:
        display.close()
        ctx.exit(cancel_on_interrupt(url, api_key, task_id))
    extension = output_format or (final.get("metadata") or {}).get("format") or "png"
    if extension not in FORMATS:
        extension = "png"  # the server's word only picks among the known formats
    target = output or Path(f"{task_id}.{extension}")
    if target.is_dir():
        target = target / f"{task_id}.{extension}"
    try:
        target.write_bytes(data)
    except OSError as exc:
        raise click.ClickException(f"cannot write {target}: {exc.strerror}") from None
    click.echo(str(target))


def cancel_on_interrupt(url: str, key: str, task_id: str) -> int:
    """Cancel the task after Ctrl-C and say so; the exit status (130)."""
    try:
        api(url, key, "DELETE", f"/task/{task_id}", timeout=10.0)
        click.echo(f"cancelled task {task_id}", err=True)
    except ApiError as exc:
        if exc.status == 409:
            state = exc.body.get("task_status", "finished")
            click.echo(f"task {task_id} had already finished ({state}); not cancelled", err=True)
        else:
            click.echo(f"could not cancel task {task_id}: {exc.message}", err=True)
    except click.ClickException as exc:
        click.echo(f"could not cancel task {task_id}: {exc.message}", err=True)
    return 130


def when(timestamp: float | None) -> str:
    """A Unix time as local `YYYY-MM-DD HH:MM:SS`, or "-"."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def visible(task: dict[str, Any]) -> dict[str, Any]:
    """A task body without its inline image."""
    return {k: v for k, v in task.items() if k not in HIDDEN}


@click.group("tasks")
def tasks_group() -> None:
    """Your tasks, through a front: list, show, cancel."""


@tasks_group.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="only tasks in this state")
@click.option("--limit", type=click.IntRange(1, 100), help="tasks per page (server default 20)")
@click.option("--cursor", help="the next cursor of the previous page")
@url_option
@key_option
@json_option
def list_tasks(status: str | None, limit: int | None, cursor: str | None, url: str, api_key: str,
               as_json: bool) -> None:
    """Your tasks, newest first (admin keys: every key's)."""
    query = {k: v for k, v in (("status", status), ("limit", limit), ("cursor", cursor)) if v is not None}
    path = "/tasks" + ("?" + urllib.parse.urlencode(query) if query else "")
    body = api(url, api_key, "GET", path)
    if as_json:
        click.echo(json.dumps({**body, "tasks": [visible(t) for t in body["tasks"]]}, indent=2, ensure_ascii=False))
        return
    if not body["tasks"]:
        click.echo("no tasks")
    else:
        rows = [("TASK ID", "STATUS", "MODEL", "MODE", "CREATED")]
        rows += [(t["task_id"], t["status"], t["model_id"], t["mode"], when(t.get("created_at")))
                 for t in body["tasks"]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo(printable("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()))
    if body.get("next_cursor"):
        click.echo(f"more: genservectl tasks list --cursor {body['next_cursor']}", err=True)


@tasks_group.command("show")
@click.argument("task_id")
@url_option
@key_option
@json_option
def show(task_id: str, url: str, api_key: str, as_json: bool) -> None:
    """One task's state, progress, error or result (never the image itself)."""
    task = visible(api(url, api_key, "GET", f"/task/{urllib.parse.quote(task_id, safe='')}"))
    if as_json:
        click.echo(json.dumps(task, indent=2, ensure_ascii=False))
        return
    progress = task.get("progress") or {}
    meta = task.get("metadata") or {}
    fields = [
        ("task_id", task.get("task_id")), ("status", task.get("status")), ("model", task.get("model_id")),
        ("mode", task.get("mode")), ("controlnet_type", task.get("controlnet_type")),
        ("priority", task.get("priority")), ("queue_position", task.get("queue_position")),
        ("progress", f"{progress.get('step')}/{progress.get('total')}" if progress else None),
        ("node", task.get("node_id")), ("attempts", task.get("attempts")),
        ("created", when(task.get("created_at"))), ("started", when(task.get("started_at"))),
        ("finished", when(task.get("finished_at"))),
        ("error_code", task.get("error_code")), ("error", task.get("error")),
        ("prompt", meta.get("prompt")),
        ("size", f"{meta['width']}x{meta['height']}" if meta.get("width") else None),
        ("steps", meta.get("steps")), ("cfg", meta.get("cfg")), ("seed", meta.get("seed")),
        ("format", meta.get("format")),
        ("loras", ", ".join(f"{lo['name']}:{lo['weight']}" for lo in meta.get("loras") or []) or None),
        ("generation_time", f"{meta['generation_time']:.2f}s" if meta.get("generation_time") else None),
        ("image_url", url.rstrip("/") + task["image_url"] if task.get("image_url") else None),
        ("note", task.get("detail") if task.get("result_expired") else None),
    ]
    for name, value in fields:
        if value is not None and value != "-":
            click.echo(f"{name + ':':<17}{printable(value)}")


@tasks_group.command("cancel")
@click.argument("task_id")
@url_option
@key_option
def cancel(task_id: str, url: str, api_key: str) -> None:
    """Cancel a queued or running task."""
    try:
        body = api(url, api_key, "DELETE", f"/task/{urllib.parse.quote(task_id, safe='')}")
    except ApiError as exc:
        if exc.status == 409:
            state = exc.body.get("task_status", "finished")
            raise click.ClickException(f"task {task_id} already finished ({state}); nothing to cancel") from None
        raise
    click.echo(f"cancelled task {body.get('task_id', task_id)}")
