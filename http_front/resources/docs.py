"""GET /openapi.json and GET /docs: the API's description, public (no key needed).

/docs is one self-contained page: its script and style are inline and allowed by hash in
a strict Content-Security-Policy, it loads nothing but ./openapi.json, and it builds the
page with DOM calls only (no innerHTML), so the document's text is never parsed as HTML.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import falcon

from http_front.jsonout import dumps

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:70em;padding:1em 2em;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;margin-top:2em}
section.op{border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.2em 1em}
.m{display:inline-block;min-width:4.5em;font-weight:bold;text-transform:uppercase}
.m.get{color:#06c}.m.post{color:#080}.m.delete{color:#b00}
code,pre{font:13px ui-monospace,monospace;background:#f5f5f5;padding:0 .2em}
pre{padding:.5em;overflow:auto;white-space:pre-wrap}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
.perm{color:#555}.err{color:#b00}
"""

_SCRIPT = """
'use strict';
const root = document.getElementById('root');
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function add(parent, ...kids) { for (const k of kids) parent.appendChild(k); return parent; }
function refName(s) { return s && s.$ref ? s.$ref.split('/').pop() : null; }
function typeOf(s) {
  if (!s) return 'any';
  const r = refName(s);
  if (r) { const a = el('a', r); a.href = '#schema-' + r; return a; }
  if (s.anyOf) { const span = el('span'); s.anyOf.forEach((x, i) => { if (i) add(span, el('span', ' | ')); add(span, typeOf(x)); }); return span; }
  if (s.enum) return el('span', s.enum.map(v => JSON.stringify(v)).join(' | '));
  if (s.type === 'array') { const span = el('span', 'array of '); return add(span, typeOf(s.items)); }
  return el('span', (s.type || 'any') + (s.format ? ' (' + s.format + ')' : ''));
}
const LIMITS = ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'minLength', 'maxLength',
                'maxItems', 'pattern', 'default'];
function limits(s) {
  const out = [];
  for (const k of LIMITS) if (s && s[k] !== undefined) out.push(k + ': ' + JSON.stringify(s[k]));
  return out.join(', ');
}
function schemaTable(s) {
  const t = el('table');
  add(t, add(el('tr'), el('th', 'field'), el('th', 'type'), el('th', 'required'), el('th', 'limits'), el('th', 'description')));
  const req = new Set(s.required || []);
  for (const [name, p] of Object.entries(s.properties || {})) {
    add(t, add(el('tr'), add(el('td'), el('code', name)), add(el('td'), typeOf(p)), el('td', req.has(name) ? 'yes' : ''),
               el('td', limits(p)), el('td', p.description || '')));
  }
  return t;
}
function operation(path, method, op) {
  const sec = add(el('section', null, 'op'));
  add(sec, add(el('h3'), el('span', method, 'm ' + method), el('code', path), el('span', ' ' + (op.summary || ''))));
  if (op.description) add(sec, el('p', op.description, 'perm'));
  if ((op.parameters || []).length) {
    const t = el('table');
    add(t, add(el('tr'), el('th', 'parameter'), el('th', 'in'), el('th', 'type'), el('th', 'description')));
    for (const p of op.parameters) add(t, add(el('tr'), add(el('td'), el('code', p.name)), el('td', p.in), add(el('td'), typeOf(p.schema)), el('td', p.description || '')));
    add(sec, el('h4', 'Parameters'), t);
  }
  if (op.requestBody) {
    const ul = el('ul');
    for (const [media, c] of Object.entries(op.requestBody.content)) add(ul, add(el('li'), el('code', media), el('span', ': '), typeOf(c.schema)));
    add(sec, el('h4', 'Request body'), ul);
  }
  const ul = el('ul');
  for (const [status, r] of Object.entries(op.responses || {})) {
    const li = add(el('li'), el('b', status, status >= '400' ? 'err' : ''), el('span', ' ' + (r.description || '') + ' '));
    for (const c of Object.values(r.content || {})) add(li, typeOf(c.schema));
    add(ul, li);
  }
  return add(sec, el('h4', 'Responses'), ul);
}
function render(doc) {
  document.title = doc.info.title + ' ' + doc.info.version;
  add(root, el('h1', doc.info.title + ' ' + doc.info.version), el('pre', doc.info.description || ''));
  add(root, el('h2', 'Authentication'));
  const ul = el('ul');
  for (const [name, s] of Object.entries(doc.components.securitySchemes || {})) add(ul, el('li', name + ': ' + (s.description || s.type)));
  add(root, ul, el('h2', 'Operations'));
  for (const [path, ops] of Object.entries(doc.paths)) for (const [method, op] of Object.entries(ops)) add(root, operation(path, method, op));
  add(root, el('h2', 'Schemas'));
  for (const [name, s] of Object.entries(doc.components.schemas)) {
    const h = el('h3', name); h.id = 'schema-' + name;
    add(root, h, el('p', s.description || ''), schemaTable(s));
  }
}
fetch('openapi.json', {credentials: 'omit'})
  .then(r => { if (!r.ok) throw new Error('GET openapi.json: ' + r.status); return r.json(); })
  .then(render)
  .catch(e => add(root, el('p', String(e), 'err')));
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


PAGE = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>GenServe API</title><style>{_STYLE}</style></head>"
        f"<body><main id=\"root\"></main><script>{_SCRIPT}</script></body></html>\n").encode()
CSP = ("default-src 'none'; "
       f"script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; connect-src 'self'; "
       "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


class OpenApiDocument:
    """GET /openapi.json : the OpenAPI 3.1 document (public)."""

    public = True

    def __init__(self) -> None:
        self._body = b"{}"

    def set_document(self, document: dict[str, Any]) -> None:
        """Serve `document` from now on (create_app calls this once every route is added)."""
        self._body = dumps(document)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The document as JSON."""
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.data = self._body


class DocsPage:
    """GET /docs : the document rendered in the browser, with no CDN and no other request (public)."""

    public = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The self-contained HTML page."""
        resp.content_type = "text/html; charset=utf-8"
        for name, value in SECURITY_HEADERS.items():
            resp.set_header(name, value)
        resp.data = PAGE
