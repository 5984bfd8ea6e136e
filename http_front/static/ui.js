// GenServe's web page. Every element is built with DOM calls and filled with textContent:
// no HTML string is ever parsed (the page's CSP enforces it with Trusted Types).
'use strict';

const KEY_ITEM = 'genserve.apiKey';
const MODE_IMAGES = {
  text2img: [], img2img: ['input_image'], fill: ['input_image', 'mask_image'],
  controlnet: ['control_image'], redux: ['input_image'],
};
const IMAGE_LABELS = {input_image: 'an input image', mask_image: 'a mask image', control_image: 'a control image'};
const FINAL = new Set(['completed', 'failed', 'cancelled']);
const EVENTS = ['snapshot', 'position', 'running', 'progress', 'completed', 'failed', 'cancelled'];

const $ = (id) => document.getElementById(id);
let models = [];
let loraNames = [];
let current = null; // the followed task: {id, state, source, timer}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function option(value) {
  const node = el('option', value);
  node.value = value;
  return node;
}

function showError(message) {
  $('error').textContent = message || '';
  $('error').hidden = !message;
}

// Only this server's own paths: a URL from a response never becomes a javascript: or foreign link.
function localUrl(url) {
  // Only this front's own paths: resolved against the page, so "/\\host" tricks fail the origin test.
  if (typeof url !== 'string' || !url.startsWith('/')) return null;
  try {
    const parsed = new URL(url, window.location.href);
    return parsed.origin === window.location.origin ? parsed.pathname + parsed.search : null;
  } catch (err) {
    return null;
  }
}

// ---- the key -------------------------------------------------------------------------------

function storedKey() {
  try { return localStorage.getItem(KEY_ITEM) || ''; } catch { return ''; }
}

function saveKey(event) {
  event.preventDefault();
  const key = $('key').value.trim();
  if (!key) return showError('Enter an API key.');
  if (!/^[\x21-\x7e]+$/.test(key)) return showError('An API key has only printable ASCII characters, no spaces.');
  try { localStorage.setItem(KEY_ITEM, key); } catch { return showError('This browser does not allow storing the key.'); }
  showError(null);
  $('key-state').textContent = 'Key saved in this browser.';
  clearLists();
  loadAll();
}

function forgetKey() {
  try { localStorage.removeItem(KEY_ITEM); } catch { /* nothing stored */ }
  $('key').value = '';
  $('key-state').textContent = 'No key saved.';
  showError(null);
  clearLists();
}

// What one key was shown is not left on the page for another (or for none).
function clearLists() {
  models = [];
  loraNames = [];
  fillModels(null);
  $('loras').replaceChildren();
  renderTasks([]);
}

// ---- requests ------------------------------------------------------------------------------

// The API's errors are {"detail"} (authentication) or {"error", "detail", ...}: one readable line.
function describeError(status, body, retryAfter) {
  const prefix = {401: 'API key refused: ', 403: 'Not allowed: ', 429: 'Too many requests: '}[status] || '';
  const retry = /^\d+$/.test(retryAfter || '') ? ` (try again in ${retryAfter} s)` : '';
  if (body && typeof body.detail === 'string') {
    const error = typeof body.error === 'string' && body.error !== body.detail ? `${body.error}: ` : '';
    return prefix + error + body.detail + retry;
  }
  return `${prefix}the server answered ${status}${retry}.`;
}

async function api(path, options = {}) {
  const key = storedKey();
  if (!key) throw new Error('Enter your API key and save it first.');
  let response;
  try {
    response = await fetch(path, {
      ...options, credentials: 'omit', cache: 'no-store',
      headers: {...options.headers, Authorization: `Bearer ${key}`},
    });
  } catch {
    throw new Error('Cannot reach the server. Check the connection and try again.');
  }
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (!response.ok) throw new Error(describeError(response.status, body, response.headers.get('Retry-After')));
  return body || {};
}

async function loadAll() {
  const results = await Promise.allSettled([loadModels(), loadLoras(), loadTasks()]);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) showError(failed.reason.message);
}

// ---- models, modes, LoRAs ------------------------------------------------------------------

async function loadModels() {
  const body = await api('models');
  models = Array.isArray(body.models) ? body.models : [];
  fillModels(body.default_model);
  if (!models.length) throw new Error('No GPU node serves a model right now; try again later.');
}

function fillModels(preferred) {
  const select = $('model');
  const keep = select.value;
  select.replaceChildren(...models.map((m) => option(m.model_id)));
  const ids = models.map((m) => m.model_id);
  select.value = ids.includes(keep) ? keep : ids.includes(preferred) ? preferred : (ids[0] || '');
  fillModes();
}

function chosenModel() {
  return models.find((m) => m.model_id === $('model').value) || null;
}

function fillModes() {
  const select = $('mode');
  const keep = select.value;
  const modes = chosenModel()?.modes || [];
  select.replaceChildren(...modes.map(option));
  select.value = modes.includes(keep) ? keep : modes.includes('text2img') ? 'text2img' : (modes[0] || '');
  updateModeFields();
}

function updateModeFields() {
  const mode = $('mode').value;
  const needed = MODE_IMAGES[mode] || [];
  for (const label of document.querySelectorAll('[data-image]')) label.hidden = !needed.includes(label.dataset.image);
  $('strength-field').hidden = mode !== 'img2img';
  const type = mode === 'controlnet' ? chosenModel()?.controlnet_type : null;
  $('control-type').hidden = !type;
  $('control-type').textContent = type ? `Control type: ${type}` : '';
}

async function loadLoras() {
  const body = await api('loras');
  loraNames = Array.isArray(body.loras) ? body.loras.map((l) => l.name) : [];
  $('add-lora').disabled = !loraNames.length;
  $('add-lora').title = loraNames.length ? '' : 'No LoRA is available';
  for (const select of document.querySelectorAll('#loras select')) fillLoraSelect(select);
}

function fillLoraSelect(select) {
  const keep = select.value;
  select.replaceChildren(...loraNames.map(option));
  if (loraNames.includes(keep)) select.value = keep;
}

function addLora() {
  const row = el('div', null, 'lora');
  const select = el('select');
  select.setAttribute('aria-label', 'LoRA');
  fillLoraSelect(select);
  const weight = el('input');
  Object.assign(weight, {type: 'number', min: '0', max: '2', step: 'any', value: '1'});
  weight.setAttribute('aria-label', 'weight');
  const remove = el('button', 'Remove', 'secondary');
  remove.type = 'button';
  remove.addEventListener('click', () => row.remove());
  row.append(select, weight, remove);
  $('loras').append(row);
}

function chosenLoras() {
  return [...document.querySelectorAll('#loras .lora')].map((row) => ({
    name: row.querySelector('select').value,
    weight: Number(row.querySelector('input').value || 1),
  })).filter((l) => l.name);
}

// ---- submitting ----------------------------------------------------------------------------

function buildForm() {
  const mode = $('mode').value;
  const model = chosenModel();
  if (!model) throw new Error('No model to choose from: save a valid key, or wait for a GPU node.');
  const prompt = $('prompt').value;
  if (!prompt.trim() && mode !== 'redux') throw new Error('Write a prompt first.');
  const form = new FormData();
  if (prompt.trim()) form.append('prompt', prompt);
  form.append('model_id', model.model_id);
  form.append('mode', mode);
  const fields = [['width', 'width'], ['height', 'height'], ['num_inference_steps', 'steps'], ['cfg', 'cfg'],
    ['seed', 'seed']];
  if (mode === 'img2img') fields.push(['strength', 'strength']);
  for (const [name, id] of fields) {
    const value = $(id).value.trim();
    if (value) form.append(name, value);
  }
  if (mode === 'controlnet' && model.controlnet_type) form.append('controlnet_type', model.controlnet_type);
  for (const name of MODE_IMAGES[mode] || []) {
    const file = $(name).files[0];
    if (!file) throw new Error(`The ${mode} mode needs ${IMAGE_LABELS[name]}: choose a file.`);
    form.append(name, file);
  }
  const loras = chosenLoras();
  if (loras.length) form.append('loras', JSON.stringify(loras));
  form.append('async', 'true');
  return form;
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  const button = $('generate');
  button.disabled = true;
  try {
    const accepted = await api('generate/upload', {method: 'POST', body: buildForm()});
    follow(accepted);
    loadTasks().catch((e) => showError(e.message));
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- following one task --------------------------------------------------------------------

function stopFollowing() {
  if (!current) return;
  if (current.source) current.source.close();
  clearInterval(current.timer);
  current = null;
}

function follow(task) {
  stopFollowing();
  current = {id: task.task_id, state: {}, source: null, timer: null};
  $('result').hidden = true;
  $('result-img').removeAttribute('src');
  $('task-id').textContent = `Task ${task.task_id}`;
  $('task-id').dataset.taskId = task.task_id;
  $('task-id').hidden = false;
  update(task.task_id, task);
  const url = localUrl(task.events_url);
  if (FINAL.has(task.status)) return;
  if (!url) return poll(task.task_id);
  const source = new EventSource(url);
  current.source = source;
  for (const name of EVENTS) {
    source.addEventListener(name, (e) => {
      let data = null;
      try { data = JSON.parse(e.data); } catch { return; }
      update(task.task_id, data);
    });
  }
  // EventSource reconnects by itself; once it gives up (e.g. the signed URL expired), poll instead.
  source.addEventListener('error', () => {
    if (source.readyState === EventSource.CLOSED && current?.source === source) poll(task.task_id);
  });
}

function poll(id) {
  if (!current || current.id !== id) return;
  if (current.source) current.source.close();
  current.source = null;
  clearInterval(current.timer);
  current.timer = setInterval(async () => {
    try {
      update(id, await api(`task/${encodeURIComponent(id)}`));
    } catch (e) {
      showError(e.message);
      if (current?.id === id) clearInterval(current.timer);
    }
  }, 1000);
}

function update(id, data) {
  if (!current || current.id !== id || FINAL.has(current.state.status)) return;
  const state = current.state;
  Object.assign(state, data);
  if (data.progress) Object.assign(state, data.progress);
  renderState(id, state);
  if (FINAL.has(state.status)) {
    if (current.source) current.source.close();
    clearInterval(current.timer);
    loadTasks().catch((e) => showError(e.message));
  }
}

function renderState(id, state) {
  const text = $('task-state');
  const progress = $('progress');
  text.dataset.status = state.status || '';
  progress.hidden = state.status !== 'running';
  $('cancel').hidden = FINAL.has(state.status);
  if (state.status === 'queued') {
    const ahead = state.queue_position;
    text.textContent = typeof ahead === 'number'
      ? `Queued: ${ahead === 0 ? 'next in line' : `${ahead} task${ahead === 1 ? '' : 's'} ahead`}.` : 'Queued.';
  } else if (state.status === 'running') {
    const steps = typeof state.step === 'number' && state.total ? `: step ${state.step} of ${state.total}` : '';
    text.textContent = `Running${state.node_id ? ` on ${state.node_id}` : ''}${steps}.`;
    if (state.total) { progress.max = state.total; progress.value = state.step || 0; }
  } else if (state.status === 'completed') {
    text.textContent = 'Completed.';
    showResult(id, state);
  } else if (state.status === 'failed') {
    text.textContent = `Failed: ${state.error || state.error_code || 'unknown error'}.`;
  } else if (state.status === 'cancelled') {
    text.textContent = 'Cancelled.';
  } else {
    text.textContent = `Task ${id}: ${state.status || 'accepted'}.`;
  }
}

function showResult(id, state) {
  const url = localUrl(state.image_url);
  if (!url) {
    $('task-state').textContent = 'Completed, but the image is no longer available.';
    return;
  }
  const meta = state.metadata || {};
  $('result-img').src = url;
  $('download').href = url;
  $('download').download = `genserve-${id}.${meta.format || 'png'}`;
  const parts = [meta.width && `${meta.width}x${meta.height}`, meta.steps && `${meta.steps} steps`,
    meta.seed !== undefined && `seed ${meta.seed}`,
    typeof state.elapsed_time === 'number' && `${state.elapsed_time.toFixed(1)} s`];
  $('result-info').textContent = parts.filter(Boolean).join(' · ');
  $('result').hidden = false;
}

async function cancelTask(id) {
  showError(null);
  try {
    const body = await api(`task/${encodeURIComponent(id)}`, {method: 'DELETE'});
    if (current?.id === id) update(id, body);
    await loadTasks();
  } catch (e) {
    showError(e.message);
  }
}

async function showTask(id) {
  showError(null);
  try {
    follow(await api(`task/${encodeURIComponent(id)}`));
  } catch (e) {
    showError(e.message);
  }
}

// ---- recent tasks --------------------------------------------------------------------------

async function loadTasks() {
  const body = await api('tasks?limit=20');
  renderTasks(Array.isArray(body.tasks) ? body.tasks : []);
}

function renderTasks(tasks) {
  $('tasks').replaceChildren(...tasks.map(taskItem));
  $('tasks-empty').hidden = tasks.length > 0;
}

function taskItem(task) {
  const item = el('li', null, 'task');
  item.dataset.taskId = task.task_id;
  item.dataset.status = task.status;
  const url = localUrl(task.image_url);
  if (url) {
    const thumb = el('img', null, 'thumb');
    thumb.src = url;
    thumb.alt = '';
    item.append(thumb);
  } else {
    item.append(el('span', null, 'thumb'));
  }
  const info = el('div', null, 'info');
  const when = task.created_at ? new Date(task.created_at * 1000).toLocaleString() : '';
  info.append(el('span', task.status, `badge ${task.status}`),
    el('span', ` ${task.model_id} · ${task.mode} · ${when}`, 'muted'));
  const prompt = task.metadata?.prompt;
  if (prompt) info.append(el('div', prompt, 'prompt'));
  if (task.error) info.append(el('div', task.error, 'task-error'));
  item.append(info);
  const actions = el('div', null, 'actions');
  const show = el('button', 'Show', 'secondary');
  show.type = 'button';
  show.addEventListener('click', () => showTask(task.task_id));
  actions.append(show);
  if (!FINAL.has(task.status)) {
    const cancel = el('button', 'Cancel', 'danger');
    cancel.type = 'button';
    cancel.addEventListener('click', () => cancelTask(task.task_id));
    actions.append(cancel);
  }
  item.append(actions);
  return item;
}

// ---- start ---------------------------------------------------------------------------------

function start() {
  $('key-form').addEventListener('submit', saveKey);
  $('forget-key').addEventListener('click', forgetKey);
  $('model').addEventListener('change', fillModes);
  $('mode').addEventListener('change', updateModeFields);
  $('add-lora').addEventListener('click', addLora);
  $('gen-form').addEventListener('submit', submit);
  $('cancel').addEventListener('click', () => current && cancelTask(current.id));
  $('refresh').addEventListener('click', () => { showError(null); loadTasks().catch((e) => showError(e.message)); });
  $('result-img').addEventListener('error', () => {
    if ($('result-img').getAttribute('src')) showError('The image could not be loaded; its link may have expired.');
  });
  const key = storedKey();
  $('key').value = key;
  $('key-state').textContent = key ? 'Key saved in this browser.' : 'No key saved.';
  if (key) loadAll();
}

start();
