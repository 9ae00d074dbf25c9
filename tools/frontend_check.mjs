// Loads each example workflow in the real ComfyUI frontend (headless Chromium) and checks it.
// Usage (see tools/frontend_check.md):
//   cd <dir with puppeteer-core installed> && node /path/to/tools/frontend_check.mjs [url] [workflow_dir] [png_dir]
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const require = createRequire(path.join(process.cwd(), 'noop.js')); // puppeteer-core from the cwd
const puppeteer = require('puppeteer-core');

const here = path.dirname(new URL(import.meta.url).pathname);
const URL_ = process.argv[2] || 'http://127.0.0.1:8188';
const WF_DIR = process.argv[3] || path.join(here, '..', 'example_workflows');
const PNG_DIR = process.argv[4] || path.join(here, '..', 'docs');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const objectInfo = await (await fetch(`${URL_}/object_info`)).json();

// What the JSON says each named widget holds, read against the server's node definition.
function expectedWidgets(node) {
  const def = objectInfo[node.type];
  if (!def || !Array.isArray(node.widgets_values)) return null;
  const order = [...(def.input_order.required || []), ...(def.input_order.optional || [])];
  const all = { ...(def.input.required || {}), ...(def.input.optional || {}) };
  const linked = new Set((node.inputs || []).filter((i) => i.link != null && !i.widget).map((i) => i.name));
  const out = {};
  let k = 0;
  for (const name of order) {
    const [type, opts = {}] = all[name];
    const isWidget = Array.isArray(type) || ['COMBO', 'INT', 'FLOAT', 'STRING', 'BOOLEAN'].includes(type);
    if (!isWidget || linked.has(name)) continue;
    out[name] = node.widgets_values[k++];
    if (opts.control_after_generate || ((name === 'seed' || name === 'noise_seed') && type === 'INT')) k++; // skip control_after_generate
  }
  return out;
}

function expectedPrompt(wf) {
  const links = new Map(wf.links.map((l) => [l[0], l]));
  const out = {};
  for (const n of wf.nodes) {
    if (!objectInfo[n.type] || n.mode === 4) continue; // Note etc. are frontend-only
    const inputs = { ...(expectedWidgets(n) || {}) };
    for (const i of n.inputs || []) if (i.link != null) { const l = links.get(i.link); inputs[i.name] = [String(l[1]), l[2]]; }
    out[String(n.id)] = { class_type: n.type, inputs };
  }
  return out;
}

const same = (a, b) => (typeof a === 'number' && typeof b === 'number' ? Math.abs(a - b) < 1e-6 : JSON.stringify(a) === JSON.stringify(b));

const browser = await puppeteer.launch({
  executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'],
  defaultViewport: { width: 1600, height: 900, deviceScaleFactor: 1 }, protocolTimeout: 600000,
});
const page = await browser.newPage();
let consoleErrors = [];
page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
page.on('pageerror', (e) => consoleErrors.push('pageerror: ' + e.message));
page.on('response', (r) => { if (r.status() >= 400) consoleErrors.push(`HTTP ${r.status()} ${r.url()}`); });
page.on('requestfailed', (r) => consoleErrors.push(`request failed ${r.url()} ${r.failure()?.errorText}`));

await page.goto(URL_, { waitUntil: 'domcontentloaded', timeout: 300000 });
await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph, { timeout: 300000, polling: 1000 });
await sleep(4000);
const startupErrors = consoleErrors; consoleErrors = [];
console.log('frontend', await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__));
console.log('startup console errors (before any workflow):', startupErrors);

// Screenshot-friendly UI: focus mode (no side/top bars), no minimap, no canvas info. Settings are put back at the end.
const savedSettings = await page.evaluate(async () => {
  const s = window.app.extensionManager.setting, saved = {};
  for (const [k, v] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasInfo', false]]) { saved[k] = s.get(k); await s.set(k, v); }
  window.app.extensionManager.focusMode = true;
  return saved;
});
const restoreUi = () => page.evaluate(async (saved) => {
  for (const [k, v] of Object.entries(saved)) await window.app.extensionManager.setting.set(k, v);
}, savedSettings);

const closeDialogs = async () => {
  for (let i = 0; i < 5; i++) {
    const n = await page.evaluate(() => { const b = document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog-header-close'); b.forEach((x) => x.click()); return b.length; });
    if (!n) break; await sleep(500);
  }
};
const dialogText = () => page.evaluate(() => [...document.querySelectorAll('.p-dialog, .p-toast-message')].map((d) => d.innerText.replace(/\s+/g, ' ').slice(0, 400)));

async function load(wf, name) {
  await closeDialogs();
  consoleErrors = [];
  await page.evaluate(async (wf, name) => { await window.app.loadGraphData(wf, true, true, name); }, wf, name);
  await sleep(2500);
  return { dialogs: await dialogText(), errors: consoleErrors };
}

const report = {};
for (const file of fs.readdirSync(WF_DIR).filter((f) => f.endsWith('.json')).sort()) {
  const stem = file.replace(/\.json$/, '');
  const wf = JSON.parse(fs.readFileSync(path.join(WF_DIR, file), 'utf8'));
  const { dialogs, errors } = await load(wf, stem);
  const graphInfo = await page.evaluate(() => {
    const LG = window.LiteGraph;
    return window.app.graph._nodes.map((n) => ({
      id: n.id, type: n.type, registered: !!LG.registered_node_types[n.type], hasErrors: !!n.has_errors,
      widgets: (n.widgets || []).map((w) => ({ name: w.name, value: w.value, options: w.options?.values })),
      serialized: n.serialize().widgets_values, size: [...n.size], minSize: [...n.computeSize()],
    }));
  });
  const problems = [];
  if (graphInfo.length !== wf.nodes.length) problems.push(`node count ${graphInfo.length} != ${wf.nodes.length}`);
  for (const jn of wf.nodes) {
    const g = graphInfo.find((x) => x.id === jn.id);
    if (!g) { problems.push(`node ${jn.id} ${jn.type} not in graph`); continue; }
    if (!g.registered) problems.push(`node ${jn.id}: type ${jn.type} not registered`);
    if (g.hasErrors) problems.push(`node ${jn.id}: has_errors`);
    if (jn.widgets_values && JSON.stringify(g.serialized) !== JSON.stringify(jn.widgets_values))
      problems.push(`node ${jn.id} ${jn.type}: serialized widgets_values ${JSON.stringify(g.serialized)} != JSON ${JSON.stringify(jn.widgets_values)}`);
    const exp = expectedWidgets(jn) || {};
    for (const [name, v] of Object.entries(exp)) {
      const w = g.widgets.find((x) => x.name === name);
      if (!w) problems.push(`node ${jn.id} ${jn.type}: no widget ${name}`);
      else if (!same(w.value, v)) problems.push(`node ${jn.id} ${jn.type}: widget ${name} = ${JSON.stringify(w.value)}, JSON/definition order says ${JSON.stringify(v)}`);
      else if (Array.isArray(w.options) && !w.options.includes(w.value)) problems.push(`(info) node ${jn.id} ${jn.type}: ${name} = ${JSON.stringify(w.value)} is not among the server's options (file not installed)`);
    }
    if (g.size[1] + 0.5 < g.minSize[1] || g.size[0] + 0.5 < g.minSize[0]) problems.push(`node ${jn.id} ${jn.type}: size ${g.size} smaller than needed ${g.minSize.map(Math.round)}`);
  }
  // What the frontend would queue.
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
  if (process.env.PROMPT_DIR) fs.writeFileSync(path.join(process.env.PROMPT_DIR, `${stem}.api.json`), JSON.stringify(prompt, null, 1));
  const pgPrompt = Object.fromEntries(Object.entries(prompt).filter(([, v]) => v.class_type.startsWith('PG_')));

  // Screenshot: close dialogs, fit the graph into the canvas.
  await closeDialogs();
  const clip = await page.evaluate(() => {
    const c = window.app.canvas, ns = window.app.graph._nodes, th = window.LiteGraph.NODE_TITLE_HEIGHT;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of ns) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th - 14); x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
    const W = c.canvas.clientWidth, H = c.canvas.clientHeight, m = 16;
    const scale = Math.min((W - 2 * m) / (x1 - x0), (H - 2 * m) / (y1 - y0));
    c.ds.scale = scale;
    c.ds.offset[0] = (W - (x1 - x0) * scale) / 2 / scale - x0;
    c.ds.offset[1] = (H - (y1 - y0) * scale) / 2 / scale - y0;
    c.deselectAll?.(); c.setDirty(true, true); c.draw(true, true);
    const r = c.canvas.getBoundingClientRect(); // clip: the graph's box on screen, without the empty canvas around it
    return { x: r.left + Math.max(0, (x0 + c.ds.offset[0]) * scale - m), y: r.top + Math.max(0, (y0 + c.ds.offset[1]) * scale - m),
      width: Math.min(W, (x1 - x0) * scale + 2 * m), height: Math.min(H, (y1 - y0) * scale + 2 * m) };
  });
  await page.mouse.move(1595, 5);
  await sleep(1500);
  const png = path.join(PNG_DIR, `workflow_${stem}.png`);
  await page.screenshot({ path: png, clip: { x: Math.floor(clip.x), y: Math.floor(clip.y), width: Math.ceil(clip.width), height: Math.ceil(clip.height) } });
  // Tooltips: hover the title, each input slot and each widget of the pack's nodes; read the frontend's tooltip.
  const tooltips = {};
  const targets = await page.evaluate(() => {
    const c = window.app.canvas, ds = c.ds, th = window.LiteGraph.NODE_TITLE_HEIGHT, out = [];
    const scr = (x, y) => [(x + ds.offset[0]) * ds.scale, (y + ds.offset[1]) * ds.scale];
    for (const n of window.app.graph._nodes) {
      if (!n.type.startsWith('PG_')) continue;
      out.push({ node: n.type, what: 'title', at: scr(n.pos[0] + n.size[0] * 0.5, n.pos[1] - th / 2) });
      n.inputs.forEach((inp, i) => { if (!inp.widget) { const p = n.getConnectionPos(true, i); out.push({ node: n.type, what: 'input ' + inp.name, at: scr(p[0] + 14, p[1]) }); } });
      for (const w of n.widgets || []) out.push({ node: n.type, what: 'widget ' + w.name, at: scr(n.pos[0] + 40, n.pos[1] + (w.last_y ?? w.y) + 10) });
    }
    return out;
  });
  for (const t of targets) {
    await page.mouse.move(5, 5); await sleep(150);
    await page.mouse.move(t.at[0], t.at[1]); await sleep(900);
    const tip = await page.evaluate(() => [...document.querySelectorAll('.node-tooltip')].filter((e) => e.offsetParent !== null && e.innerText.trim()).map((e) => e.innerText.trim()).join(' | '));
    (tooltips[t.node] ||= {})[t.what] = tip || null;
  }
  await page.mouse.move(5, 5);
  report[file] = { dialogs, consoleErrors: errors, problems, promptProblems, pgPrompt, tooltips, screenshot: png };
  console.log(`\n=== ${file}`);
  console.log(JSON.stringify(report[file], null, 1));
}
// Positive control: an unknown node type must raise the missing-nodes dialog.
{
  const ctl = { last_node_id: 1, last_link_id: 0, nodes: [{ id: 1, type: 'PG_NoSuchNode', pos: [0, 0], size: [200, 80], flags: {}, order: 0, mode: 0, properties: {} }], links: [], groups: [], config: {}, extra: {}, version: 0.4 };
  const r = await load(ctl, 'control');
  console.log('\ncontrol (unknown node type) dialogs:', r.dialogs);
  report.control = r.dialogs.some((d) => /missing nodes/i.test(d) && d.includes('PG_NoSuchNode'));
}

await restoreUi();
await browser.close();

// Summary; exit status 1 when a workflow failed (an "(info)" line or a missing tooltip alone does not fail it).
let failed = !report.control;
console.log('\nSUMMARY');
if (!report.control) console.log('  control: the missing-nodes dialog did NOT appear for an unknown node type: the check is blind');
for (const [file, r] of Object.entries(report)) {
  if (file === 'control') continue;
  const bad = [...r.dialogs, ...r.consoleErrors, ...r.problems.filter((p) => !p.startsWith('(info)')), ...r.promptProblems];
  const noTip = Object.entries(r.tooltips).flatMap(([n, t]) => Object.entries(t).filter(([, v]) => !v).map(([w]) => `${n} ${w}`));
  failed ||= bad.length > 0;
  console.log(`  ${file}: ${bad.length ? 'FAIL\n    ' + bad.join('\n    ') : 'ok'}${noTip.length ? `  (no tooltip: ${noTip.join(', ')})` : ''}`);
}
process.exit(failed ? 1 : 0);
