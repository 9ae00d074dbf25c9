// Loads each example workflow in the real ComfyUI frontend (headless Chromium) and checks what a user meets there.
// Usage (see tools/frontend_check.md):
//   cd <dir with puppeteer-core installed> && node /path/to/tools/frontend_check.mjs [url] [workflow_dir]
// Env: CHROMIUM (default /usr/bin/chromium); OUT_DIR for the screenshots (default a temporary folder);
// WRITE_PICTURES=1 writes them where the repository keeps them (docs/workflow_<slug>.png and the template browser's
// thumbnails example_workflows/<title>.jpg); PROMPT_DIR also writes each API prompt.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const require = createRequire(path.join(process.cwd(), 'noop.js')); // puppeteer-core from the cwd
const puppeteer = require('puppeteer-core');

const here = path.dirname(new URL(import.meta.url).pathname);
const URL_ = process.argv[2] || 'http://127.0.0.1:8188';
const WF_DIR = process.argv[3] || path.join(here, '..', 'example_workflows');
const WRITE = process.env.WRITE_PICTURES === '1';
const OUT_DIR = WRITE ? path.join(here, '..', 'docs') : process.env.OUT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'pg-frontend-'));
const THUMB_DIR = WRITE ? WF_DIR : OUT_DIR;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const MODULE = 'comfyui-personalization-guidance'; // the pack's folder name in custom_nodes (tools/frontend_server.sh)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const slug = (title) => title.toLowerCase().replace(/[^a-z0-9]+/g, '_').replace(/^_+|_+$/g, ''); // as the generator's
const objectInfo = await (await fetch(`${URL_}/object_info`)).json();
const packTypes = Object.keys(objectInfo).filter((t) => t.startsWith('PG_')).sort();

// ------------------------------------------------------------------ what the JSON says, read against the server

const DYNAMIC = 'COMFY_DYNAMICCOMBO_V3';
const isWidget = (type, opts) => (Array.isArray(type) || ['COMBO', 'INT', 'FLOAT', 'STRING', 'BOOLEAN', DYNAMIC].includes(type)) && !opts.forceInput;
const entriesOf = (spec) => ['required', 'optional'].flatMap((s) => Object.entries(spec?.[s] || {}));

// The inputs a node shows for its widget values, in the frontend's order: [{name, type, widget, value}]. A
// DynamicCombo's value is its key; that option's inputs follow it, named <combo>.<input>. Consumes `values`.
function shownInputs(entries, values, prefix = '') {
  const out = [];
  for (const [key, [type, opts = {}]] of entries) {
    const name = prefix + key;
    if (!isWidget(type, opts)) { out.push({ name, type, widget: false }); continue; }
    const value = values.shift();
    out.push({ name, type: Array.isArray(type) ? 'COMBO' : type, widget: true, value });
    if (opts.control_after_generate || ((key === 'seed' || key === 'noise_seed') && type === 'INT')) values.shift();
    if (type === DYNAMIC) {
      const option = opts.options.find((o) => o.key === value);
      if (option) out.push(...shownInputs(entriesOf(option.inputs), values, name + '.'));
    }
  }
  return out;
}

function expectedShown(node) {
  const def = objectInfo[node.type];
  if (!def) return null;
  const order = [...(def.input_order.required || []), ...(def.input_order.optional || [])];
  const all = { ...(def.input.required || {}), ...(def.input.optional || {}) };
  return shownInputs(order.map((n) => [n, all[n]]), [...(node.widgets_values || [])]);
}

function expectedPrompt(wf) {
  const links = new Map(wf.links.map((l) => [l[0], l]));
  const out = {};
  for (const n of wf.nodes) {
    if (!objectInfo[n.type] || n.mode === 4) continue; // Note etc. are frontend-only
    const inputs = {};
    for (const s of expectedShown(n)) if (s.widget) inputs[s.name] = s.value;
    for (const i of n.inputs || []) if (i.link != null) { const l = links.get(i.link); inputs[i.name] = [String(l[1]), l[2]]; }
    out[String(n.id)] = { class_type: n.type, inputs };
  }
  return out;
}

const same = (a, b) => (typeof a === 'number' && typeof b === 'number' ? Math.abs(a - b) < 1e-6 : JSON.stringify(a) === JSON.stringify(b));

// --------------------------------------------------------------------------------------------- the browser

const browser = await puppeteer.launch({
  executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'],
  defaultViewport: { width: 1600, height: 900, deviceScaleFactor: 1 }, protocolTimeout: 600000,
});
const page = await browser.newPage();
let consoleErrors = [];
// This machine is offline: the frontend's calls to api.comfy.org (release notes, at any time) fail name resolution.
// The server is reached by its IP address, so no request of the check itself resolves a name.
const offline = (text) => text.includes('ERR_NAME_NOT_RESOLVED');
page.on('console', (m) => { if (m.type() === 'error' && !offline(m.text())) consoleErrors.push(m.text()); });
page.on('pageerror', (e) => consoleErrors.push('pageerror: ' + e.message));
page.on('response', (r) => { if (r.status() >= 400) consoleErrors.push(`HTTP ${r.status()} ${r.url()}`); });
page.on('requestfailed', (r) => { if (!offline(r.failure()?.errorText || '')) consoleErrors.push(`request failed ${r.url()} ${r.failure()?.errorText}`); });

await page.goto(URL_, { waitUntil: 'domcontentloaded', timeout: 300000 });
await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph, { timeout: 300000, polling: 1000 });
await sleep(4000);
const startupErrors = consoleErrors; consoleErrors = [];
const frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__);
console.log('frontend', frontendVersion, '| pictures in', OUT_DIR);
console.log('startup console errors (before any workflow):', startupErrors);

const savedSettings = await page.evaluate(async () => {
  const s = window.app.extensionManager.setting, saved = {};
  for (const [k, v] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasInfo', false], ['Comfy.Graph.CanvasMenu', false]]) { saved[k] = s.get(k); await s.set(k, v); }
  return saved;
});
const restoreUi = () => page.evaluate(async (saved) => {
  window.app.extensionManager.focusMode = false;
  for (const [k, v] of Object.entries(saved)) await window.app.extensionManager.setting.set(k, v);
}, savedSettings);
const focusMode = (on) => page.evaluate((on) => { window.app.extensionManager.focusMode = on; }, on);

const closeDialogs = async () => {
  for (let i = 0; i < 5; i++) {
    const n = await page.evaluate(() => {
      const b = document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog-header-close, [data-testid="error-overlay"] button[aria-label="Close"]');
      b.forEach((x) => x.click()); return b.length;
    });
    if (!n) break; await sleep(500);
  }
  await page.keyboard.press('Escape');
};
// Dialogs, toasts, and (frontend 1.4x) the error overlay, which reports missing nodes.
const dialogText = () => page.evaluate(() => [...document.querySelectorAll('.p-dialog, .p-toast-message, [data-testid="error-overlay"]')].map((d) => d.innerText.replace(/\s+/g, ' ').slice(0, 400)));

async function load(wf, name) {
  await closeDialogs();
  consoleErrors = [];
  await page.evaluate(async (wf, name) => { await window.app.loadGraphData(wf, true, true, name); }, wf, name);
  await sleep(2500);
  return { dialogs: await dialogText(), errors: consoleErrors };
}

// What the frontend made of the loaded graph: per node its widgets, serialization and the box it is drawn in.
const graphInfo = () => page.evaluate(() => {
  const LG = window.LiteGraph, th = LG.NODE_TITLE_HEIGHT;
  return window.app.graph._nodes.map((n) => {
    const min = n.computeSize(), s = n.serialize();
    const w = Math.max(n.size[0], min[0]), h = Math.max(n.size[1], min[1]);
    return {
      id: n.id, type: n.type, title: n.title, registered: !!LG.registered_node_types[n.type], hasErrors: !!n.has_errors,
      widgets: (n.widgets || []).map((x) => ({ name: x.name, value: x.value, options: x.options?.values })),
      serialized: s.widgets_values, inputs: (s.inputs || []).map((i) => ({ name: i.name, link: i.link ?? null })),
      size: [...n.size], minSize: [...min], box: [n.pos[0], n.pos[1] - th, n.pos[0] + w, n.pos[1] + h],
    };
  });
});

// The nodes' boxes that overlap: each is a problem (the frontend draws a node at least as large as computeSize).
function overlaps(info) {
  const out = [];
  for (let i = 0; i < info.length; i++) for (let j = i + 1; j < info.length; j++) {
    const a = info[i].box, b = info[j].box;
    if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
      out.push(`nodes ${info[i].id} ${info[i].title} and ${info[j].id} ${info[j].title} overlap as drawn (${a.map(Math.round)} / ${b.map(Math.round)})`);
  }
  return out;
}

// With the frontend's sidebar and menus shown, as the workflow opens: nodes in the left half of the window that
// something covers (the element at their title's top-left corner is not the canvas).
const coveredNodes = () => page.evaluate(() => {
  const c = window.app.canvas, ds = c.ds, th = window.LiteGraph.NODE_TITLE_HEIGHT, r = c.canvas.getBoundingClientRect(), out = [];
  for (const n of window.app.graph._nodes) {
    const x = r.left + (n.pos[0] + ds.offset[0]) * ds.scale + 2, y = r.top + (n.pos[1] - th + ds.offset[1]) * ds.scale + 2;
    if (x < 0 || y < 0 || x > window.innerWidth / 2 || y > window.innerHeight / 2) continue;
    const el = document.elementFromPoint(x, y);
    if (el !== c.canvas) out.push(`node ${n.id} ${n.title}: its title starts under ${el?.tagName?.toLowerCase()}.${[...(el?.classList || [])].slice(0, 3).join('.')} at (${Math.round(x)}, ${Math.round(y)})`);
  }
  return out;
});

// Fits the nodes that `pick` names (all by default) into the canvas, or into a square in its middle, and saves
// a screenshot of that box into `file` (none: only fit, e.g. for hovering).
async function shoot(file, { pick = 'all', square = false, type = 'png' } = {}) {
  const clip = await page.evaluate((pick, square) => {
    const c = window.app.canvas, th = window.LiteGraph.NODE_TITLE_HEIGHT;
    const thumb = (n) => n.type.startsWith('PG_') && !['PG_LoadFinetunedPair', 'PG_PairFromModels', 'PG_SavePreset'].includes(n.type);
    const ns = window.app.graph._nodes.filter((n) => pick === 'all' || thumb(n));
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of ns) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th - 14); x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
    const W = c.canvas.clientWidth, H = c.canvas.clientHeight, m = 16;
    const side = Math.min(W, H) - 2 * m; // the square's side
    const [bw, bh] = square ? [side, side] : [W - 2 * m, H - 2 * m];
    const scale = Math.min(bw / (x1 - x0), bh / (y1 - y0));
    c.ds.scale = scale;
    c.ds.offset[0] = (W - (x1 - x0) * scale) / 2 / scale - x0;
    c.ds.offset[1] = (H - (y1 - y0) * scale) / 2 / scale - y0;
    c.deselectAll?.(); c.setDirty(true, true); c.draw(true, true);
    const r = c.canvas.getBoundingClientRect();
    if (square) return { x: r.left + (W - side) / 2 - m, y: r.top + (H - side) / 2 - m, width: side + 2 * m, height: side + 2 * m };
    return { x: r.left + Math.max(0, (x0 + c.ds.offset[0]) * scale - m), y: r.top + Math.max(0, (y0 + c.ds.offset[1]) * scale - m),
      width: Math.min(W, (x1 - x0) * scale + 2 * m), height: Math.min(H, (y1 - y0) * scale + 2 * m) };
  }, pick, square);
  await page.mouse.move(1595, 450);
  await sleep(1200);
  const box = { x: Math.floor(clip.x), y: Math.floor(clip.y), width: Math.ceil(clip.width), height: Math.ceil(clip.height) };
  if (file) await page.screenshot({ path: file, type, ...(type === 'jpeg' ? { quality: 85 } : {}), clip: box });
}

// ------------------------------------------------------------------------------------------ every workflow

const report = {};
const files = fs.readdirSync(WF_DIR).filter((f) => f.endsWith('.json')).sort();
for (const file of files) {
  const title = file.replace(/\.json$/, '');
  const wf = JSON.parse(fs.readFileSync(path.join(WF_DIR, file), 'utf8'));
  await focusMode(false);
  const { dialogs, errors } = await load(wf, title);
  const info = await graphInfo();
  const problems = [];
  if (info.length !== wf.nodes.length) problems.push(`node count ${info.length} != ${wf.nodes.length}`);
  for (const jn of wf.nodes) {
    const g = info.find((x) => String(x.id) === String(jn.id)); // frontend 1.4x keeps ids as strings
    if (!g) { problems.push(`node ${jn.id} ${jn.type} not in graph`); continue; }
    if (!g.registered) problems.push(`node ${jn.id}: type ${jn.type} not registered`);
    if (g.hasErrors) problems.push(`node ${jn.id}: has_errors`);
    // A node without widgets saves an empty list (1.35) or none (1.4x).
    if (jn.widgets_values && JSON.stringify(g.serialized ?? []) !== JSON.stringify(jn.widgets_values))
      problems.push(`node ${jn.id} ${jn.type}: serialized widgets_values ${JSON.stringify(g.serialized)} != JSON ${JSON.stringify(jn.widgets_values)}`);
    const jsonInputs = (jn.inputs || []).map((i) => ({ name: i.name, link: i.link ?? null }));
    if (JSON.stringify(g.inputs) !== JSON.stringify(jsonInputs))
      problems.push(`node ${jn.id} ${jn.type}: serialized inputs ${JSON.stringify(g.inputs)} != JSON ${JSON.stringify(jsonInputs)}`);
    for (const s of (expectedShown(jn) || []).filter((x) => x.widget)) {
      const w = g.widgets.find((x) => x.name === s.name);
      if (!w) problems.push(`node ${jn.id} ${jn.type}: no widget ${s.name}`);
      else if (!same(w.value, s.value)) problems.push(`node ${jn.id} ${jn.type}: widget ${s.name} = ${JSON.stringify(w.value)}, JSON/definition order says ${JSON.stringify(s.value)}`);
      else if (Array.isArray(w.options) && !w.options.includes(w.value)) problems.push(`(info) node ${jn.id} ${jn.type}: ${s.name} = ${JSON.stringify(w.value)} is not among the server's options (file not installed)`);
    }
    if (jn.size[1] + 0.5 < g.minSize[1] || jn.size[0] + 0.5 < g.minSize[0]) problems.push(`node ${jn.id} ${jn.title || jn.type}: saved size ${jn.size} smaller than the frontend's minimum ${g.minSize.map(Math.ceil)}`);
  }
  problems.push(...overlaps(info));
  problems.push(...(await coveredNodes()));

  // What Run would queue.
  const prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  const expPrompt = expectedPrompt(wf);
  const promptProblems = [];
  for (const [id, e] of Object.entries(expPrompt)) {
    const p = prompt[id];
    if (!p) { promptProblems.push(`node ${id} ${e.class_type} missing from prompt`); continue; }
    if (p.class_type !== e.class_type) promptProblems.push(`node ${id}: class_type ${p.class_type} != ${e.class_type}`);
    for (const k of new Set([...Object.keys(e.inputs), ...Object.keys(p.inputs)]))
      if (!same(p.inputs[k], e.inputs[k]))
        promptProblems.push(`node ${id} ${e.class_type}: input ${k} = ${JSON.stringify(p.inputs[k])}, expected ${JSON.stringify(e.inputs[k])}`);
  }
  for (const id of Object.keys(prompt)) if (!expPrompt[id]) promptProblems.push(`unexpected node ${id} in prompt`);
  if (process.env.PROMPT_DIR) fs.writeFileSync(path.join(process.env.PROMPT_DIR, `${slug(title)}.api.json`), JSON.stringify(prompt, null, 1));

  // Saved again and reloaded, the graph is the same (what "save workflow" then "open" does).
  const resaved = await page.evaluate(() => window.app.graph.serialize());
  await load(resaved, title);
  const again = await graphInfo();
  for (const g of info) {
    const h = again.find((x) => String(x.id) === String(g.id));
    if (!h || JSON.stringify(h.serialized) !== JSON.stringify(g.serialized) || JSON.stringify(h.inputs) !== JSON.stringify(g.inputs))
      problems.push(`node ${g.id} ${g.type}: not the same after saving and loading again`);
  }

  // Pictures, in focus mode (no side or top bars): the graph for the docs, the pack's nodes as the template's card.
  await closeDialogs();
  await focusMode(true);
  await sleep(500);
  const png = path.join(OUT_DIR, `workflow_${slug(title)}.png`);
  await shoot(png);
  await shoot(path.join(THUMB_DIR, `${title}.jpg`), { pick: 'thumbnail', square: true, type: 'jpeg' }); // the pack's guidance nodes

  // Tooltips: hover the title, each input slot and each widget of the pack's nodes; read the frontend's tooltip.
  await shoot(null); // the graph fitted into the window again, for the hover positions
  const tooltips = {};
  const targets = await page.evaluate(() => {
    const c = window.app.canvas, ds = c.ds, th = window.LiteGraph.NODE_TITLE_HEIGHT, out = [];
    const r = c.canvas.getBoundingClientRect();
    const scr = (x, y) => [r.left + (x + ds.offset[0]) * ds.scale, r.top + (y + ds.offset[1]) * ds.scale];
    for (const n of window.app.graph._nodes) {
      if (!n.type.startsWith('PG_')) continue;
      out.push({ node: n.type, what: 'title', at: scr(n.pos[0] + n.size[0] * 0.5, n.pos[1] - th / 2) });
      n.inputs.forEach((inp, i) => { if (!inp.widget) { const p = n.getConnectionPos(true, i); out.push({ node: n.type, what: 'input ' + inp.name, at: scr(p[0] + 14, p[1]) }); } });
      for (const w of n.widgets || []) out.push({ node: n.type, what: 'widget ' + w.name, at: scr(n.pos[0] + 40, n.pos[1] + (w.last_y ?? w.y) + 10) });
    }
    return out;
  });
  for (const t of targets) {
    await page.mouse.move(1595, 450); await sleep(150);
    await page.mouse.move(t.at[0], t.at[1]); await sleep(900);
    const tip = await page.evaluate(() => [...document.querySelectorAll('.node-tooltip')].filter((e) => e.offsetParent !== null && e.innerText.trim()).map((e) => e.innerText.trim()).join(' | '));
    (tooltips[t.node] ||= {})[t.what] = tip || null;
  }
  await page.mouse.move(1595, 450); // away from the workflow tabs, whose hover shows a preview
  const minSizes = Object.fromEntries(info.map((g) => [`${g.id} ${g.title}`, g.minSize.map(Math.ceil)]));
  report[file] = { dialogs, consoleErrors: errors, problems, promptProblems, tooltips, minSizes, screenshot: png };
  console.log(`\n=== ${file}`);
  console.log(JSON.stringify(report[file], null, 1));
}
await focusMode(false);

// ------------------------------------------------------------ a DynamicCombo switched, as a user switches it

{
  const file = files.find((f) => f.startsWith('DreamBooth'));
  const wf = JSON.parse(fs.readFileSync(path.join(WF_DIR, file), 'utf8'));
  await load(wf, 'switch');
  const result = await page.evaluate(async () => {
    const g = window.app.graph._nodes.find((n) => n.type === 'PG_PersonalizationGuider');
    const links = () => Object.keys(window.app.graph.links instanceof Map ? Object.fromEntries(window.app.graph.links) : window.app.graph.links).length;
    const before = { links: links(), inputs: g.inputs.map((i) => i.name) };
    g.widgets.find((w) => w.name === 'estimate').value = 'two-way (paper)';
    const after = { links: links(), inputs: g.inputs.map((i) => i.name), widgets: g.widgets.map((w) => w.name) };
    const prompt = (await window.app.graphToPrompt()).output[String(g.id)].inputs;
    return { before, after, prompt };
  });
  const problems = [];
  if (result.after.links !== result.before.links - 1) problems.push(`links ${result.before.links} -> ${result.after.links}: the negative's link should go`);
  if (result.after.inputs.some((n) => n.startsWith('estimate.negative') || n === 'estimate.personalization_scale')) problems.push(`two-way still shows ${result.after.inputs}`);
  if (JSON.stringify(Object.keys(result.prompt).sort()) !== JSON.stringify(['estimate', 'estimate.guidance_scale', 'model', 'null_conditioning', 'positive', 'weak_model']))
    problems.push(`two-way queues ${JSON.stringify(result.prompt)}`);
  problems.push(...consoleErrors);
  report.switch = problems;
  console.log('\nswitching the guider of', file, 'to two-way:', JSON.stringify(result), problems);
}

// ------------------------------------------------------------------- mistakes, queued with Run, as a user sees them

{
  const cases = [
    { file: 'Tuning, presets', node: 'PG_SavePreset', set: { name: 'sd15_lora' }, expect: ["'sd15_lora' is a shipped preset"] },
    { file: 'Tuning, a sweep grid', node: 'PG_Sweep', set: { omega_values: '0.3, abc, 1.5' }, expect: ["'abc' is not a number", 'got 1.5'] },
    { file: 'KSampler', node: 'PG_PersonalizationGuidanceModel', set: { estimate: 'three-way' }, expect: ['null_conditioning'] },
  ];
  const problems = [], seen = {};
  for (const c of cases) {
    const file = files.find((f) => f.startsWith(c.file));
    await load(JSON.parse(fs.readFileSync(path.join(WF_DIR, file), 'utf8')), 'mistake');
    await page.evaluate(async (c) => {
      const n = window.app.graph._nodes.find((x) => x.type === c.node);
      for (const [k, v] of Object.entries(c.set)) n.widgets.find((w) => w.name === k).value = v;
      await window.app.queuePrompt(0, 1);
    }, c);
    await sleep(6000);
    // 1.35 shows the messages in a dialog. 1.4x names the problem in its error overlay; its "View details" opens a
    // panel that lists the inputs concerned, each with an info button that shows the message.
    const details = await page.evaluate(async () => {
      const button = [...document.querySelectorAll('[data-testid="error-overlay"] button')].find((b) => /details/i.test(b.innerText));
      if (!button) return '';
      button.click();
      await new Promise((r) => setTimeout(r, 2500));
      for (const info of document.querySelectorAll('button[aria-label^="Info for"]')) info.click();
      await new Promise((r) => setTimeout(r, 1500));
      return document.body.innerText.replace(/\s+/g, ' '); // the widgets are drawn on the canvas: no text of theirs
    });
    const shown = [...(await dialogText()), details].join(' | ');
    const at = Math.max(0, ...c.expect.map((e) => shown.indexOf(e)));
    seen[c.file] = shown.slice(Math.max(0, at - 300), at + 300);
    for (const e of c.expect) if (!shown.includes(e)) problems.push(`${c.file}: the frontend does not show "${e}" (it shows: ${shown || 'nothing'})`);
    await closeDialogs();
  }
  report.mistakes = problems;
  console.log('\nmistakes queued with Run:', JSON.stringify(seen, null, 1), problems);
}

// ------------------------------------------------------------------------ the template browser and search

{
  const problems = [];
  const listed = (await (await fetch(`${URL_}/api/workflow_templates`)).json())[MODULE] || [];
  const titles = files.map((f) => f.replace(/\.json$/, ''));
  if (JSON.stringify([...listed].sort()) !== JSON.stringify([...titles].sort())) problems.push(`the server lists ${JSON.stringify(listed)}`);
  for (const t of listed) {
    const r = await fetch(`${URL_}/api/workflow_templates/${MODULE}/${encodeURIComponent(t)}.jpg`);
    if (r.status !== 200 || !(r.headers.get('content-type') || '').startsWith('image/jpeg')) problems.push(`thumbnail of ${t}: HTTP ${r.status} ${r.headers.get('content-type')}`);
  }
  // The browser's own template dialog: open it, show this pack's templates, check each card, load one by a click.
  consoleErrors = [];
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  await sleep(3000);
  const nav = await page.evaluate((module) => {
    // The category of this pack's templates ("Custom Nodes" / "Extensions", by version): the innermost element
    // that reads the pack's folder name.
    const items = [...document.querySelectorAll('.p-dialog *, [role="dialog"] *')].filter((e) => e.innerText?.trim() === module);
    const hit = items.find((e) => !items.some((o) => o !== e && e.contains(o)));
    if (hit) hit.click();
    return hit ? hit.innerText.trim() : null;
  }, MODULE);
  await sleep(2500);
  const cards = await page.evaluate(async (titles) => {
    const out = {};
    for (const t of titles) {
      const card = document.querySelector(`[data-testid="template-workflow-${CSS.escape(t)}"]`);
      if (!card) { out[t] = null; continue; }
      card.scrollIntoView(); await new Promise((r) => setTimeout(r, 1200));
      const img = card.querySelector('img');
      out[t] = { text: card.innerText.replace(/\s+/g, ' ').trim(), image: img ? { loaded: img.complete && img.naturalWidth > 0, src: img.getAttribute('src') } : null };
    }
    return out;
  }, titles);
  for (const [t, c] of Object.entries(cards)) {
    if (!c) { problems.push(`no card for ${t} (category button: ${nav})`); continue; }
    if (!c.text.includes(t)) problems.push(`card ${t} reads ${JSON.stringify(c.text)}`);
    if (!c.image?.loaded || c.image.src.includes('default-template')) problems.push(`card ${t}: its thumbnail is not shown ${JSON.stringify(c.image)}`);
  }
  const first = titles[0];
  await page.evaluate((t) => document.querySelector(`[data-testid="template-workflow-${CSS.escape(t)}"]`)?.click(), first);
  await sleep(3000);
  const loaded = await page.evaluate(() => window.app.graph._nodes.length);
  const expectedNodes = JSON.parse(fs.readFileSync(path.join(WF_DIR, `${first}.json`), 'utf8')).nodes.length;
  if (loaded !== expectedNodes) problems.push(`clicking the card of ${first} loaded ${loaded} nodes, not ${expectedNodes}`);
  const covered = await coveredNodes();
  problems.push(...covered, ...consoleErrors);
  await closeDialogs();
  report.templates = problems;
  console.log('\ntemplate browser:', JSON.stringify({ listed, nav, cards }), problems);

  // Node search, as the search box runs it (the frontend's own search service).
  const queries = ['Personalization', 'PG', 'personalization guidance', 'sweep', 'preset', 'omega', 'LoRA pair', 'DreamBooth'];
  const found = await page.evaluate((queries) => {
    const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
    const service = pinia._s.get('nodeDef').nodeSearchService;
    return Object.fromEntries(queries.map((q) => [q, service.searchNode(q).map((d) => d.name).filter((n) => n.startsWith('PG_'))]));
  }, queries);
  const search = [];
  for (const q of ['Personalization', 'PG']) {
    const missing = packTypes.filter((t) => !found[q].includes(t));
    if (missing.length) search.push(`"${q}" does not find ${missing.join(', ')}`);
  }
  report.search = search;
  console.log('\nnode search (the pack\'s nodes found):', JSON.stringify(Object.fromEntries(Object.entries(found).map(([q, f]) => [q, f.length]))), JSON.stringify(found), search);
}

// Positive control: an unknown node type must raise the missing-nodes dialog.
{
  const ctl = { last_node_id: 1, last_link_id: 0, nodes: [{ id: 1, type: 'PG_NoSuchNode', pos: [0, 0], size: [200, 80], flags: {}, order: 0, mode: 0, properties: {} }], links: [], groups: [], config: {}, extra: {}, version: 0.4 };
  const r = await load(ctl, 'control');
  console.log('\ncontrol (unknown node type) dialogs:', r.dialogs);
  report.control = r.dialogs.some((d) => /missing node/i.test(d) && d.includes('PG_NoSuchNode'));
}

await closeDialogs();
await restoreUi();
await browser.close();

// Summary; exit status 1 when a check failed (an "(info)" line or a missing tooltip alone does not fail it).
let failed = !report.control;
console.log(`\nSUMMARY (frontend ${frontendVersion})`);
if (!report.control) console.log('  control: the missing-nodes dialog did NOT appear for an unknown node type: the check is blind');
for (const [file, r] of Object.entries(report)) {
  if (['control', 'switch', 'mistakes', 'templates', 'search'].includes(file)) continue;
  const bad = [...r.dialogs, ...r.consoleErrors, ...r.problems.filter((p) => !p.startsWith('(info)')), ...r.promptProblems];
  const noTip = Object.entries(r.tooltips).flatMap(([n, t]) => Object.entries(t).filter(([, v]) => !v).map(([w]) => `${n} ${w}`));
  failed ||= bad.length > 0;
  console.log(`  ${file}: ${bad.length ? 'FAIL\n    ' + bad.join('\n    ') : 'ok'}${noTip.length ? `  (no tooltip: ${noTip.join(', ')})` : ''}`);
}
for (const part of ['switch', 'mistakes', 'templates', 'search']) {
  failed ||= report[part].length > 0;
  console.log(`  ${part}: ${report[part].length ? 'FAIL\n    ' + report[part].join('\n    ') : 'ok'}`);
}
process.exit(failed ? 1 : 0);
