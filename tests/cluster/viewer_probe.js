// Drives the system chromium (headless) with puppeteer-core through the OHIF
// Viewer served by a ShardPACS router: the study list, then one study's
// images, at the viewports asked for. Used by tests/cluster/test_viewer.py.
//
//   node viewer_probe.js CONFIG.json   (NODE_PATH: a node_modules with puppeteer-core)
//
// CONFIG: {"origin", "chromium", "userDataDir", "outDir", "expectText": [...],
//          "study", "viewports": [{"name", "width", "height", "mobile", "expectText"?}],
//          "timeoutMs"}
// Prints one JSON object: per viewport, what the list showed, the canvas
// statistics of the opened study and the screenshot paths; the browser's
// console errors and failed requests.
'use strict';
const fs = require('fs');
const path = require('path');
const puppeteer = require('puppeteer-core');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const timeout = cfg.timeoutMs || 90000;

// Statistics of the largest visible canvas in the viewport grid: pixels
// sampled on a grid, how many distinct grey values, min and max.
function canvasStats() {
  const canvases = [...document.querySelectorAll('canvas')]
    .filter(c => c.width > 32 && c.height > 32 && c.offsetParent !== null);
  let best = null;
  for (const c of canvases) {
    let data;
    try {
      const ctx = c.getContext('2d');
      if (!ctx) continue;
      data = ctx.getImageData(0, 0, c.width, c.height).data;
    } catch (e) {
      continue;
    }
    const values = new Set();
    let min = 255, max = 0, nonzero = 0, n = 0;
    const step = Math.max(1, Math.floor(c.width / 64));
    for (let y = 0; y < c.height; y += step) {
      for (let x = 0; x < c.width; x += step) {
        const i = (y * c.width + x) * 4;
        const v = data[i];
        values.add(v);
        min = Math.min(min, v);
        max = Math.max(max, v);
        if (v) nonzero++;
        n++;
      }
    }
    const s = { width: c.width, height: c.height, distinct: values.size, min, max, nonzero, samples: n,
                cls: c.className };
    if (!best || s.distinct > best.distinct) best = s;
  }
  return best;
}

(async () => {
  const out = { viewports: [], consoleErrors: [], failedRequests: [] };
  const browser = await puppeteer.launch({
    executablePath: cfg.chromium || '/usr/bin/chromium',
    headless: true,
    userDataDir: cfg.userDataDir,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
           '--disable-background-networking', '--disable-component-update', '--disable-sync',
           '--no-first-run'],
  });
  try {
    for (const vp of cfg.viewports) {
      const r = { name: vp.name };
      const page = await browser.newPage();
      page.setDefaultTimeout(timeout);
      page.on('console', m => {
        if (m.type() === 'error') out.consoleErrors.push(`${vp.name}: ${m.text()}`.slice(0, 300));
      });
      page.on('requestfailed', q => out.failedRequests.push(`${vp.name}: ${q.url()} ${q.failure()?.errorText}`));
      page.on('response', q => {
        if (q.status() >= 400) out.failedRequests.push(`${vp.name}: ${q.url()} ${q.status()}`);
      });
      await page.setViewport({ width: vp.width, height: vp.height, isMobile: !!vp.mobile,
                               hasTouch: !!vp.mobile, deviceScaleFactor: 1 });
      // The study list.
      let t0 = Date.now();
      await page.goto(`${cfg.origin}/viewer/`, { waitUntil: 'domcontentloaded' });
      const listed = t => page.waitForFunction(
        want => want.every(w => document.body && document.body.innerText.includes(w)),
        { timeout: t }, vp.expectText || cfg.expectText).then(() => true, () => false);
      r.listOk = await listed(vp.mobile ? 5000 : timeout);
      if (!r.listOk && vp.mobile) {
        // OHIF 3.13's study list keeps its preview panel open beside the
        // table, which leaves the table's columns no width on a phone: close it.
        const close = await page.$('button[aria-label="Close preview"]');
        if (close) {
          await close.click();
          r.closedPreview = true;
          r.listOk = await listed(timeout);
        }
      }
      r.listMs = Date.now() - t0;
      r.listText = (await page.evaluate(() => document.body.innerText)).slice(0, 4000);
      r.listShot = path.join(cfg.outDir, `viewer-${vp.name}-list.png`);
      await page.screenshot({ path: r.listShot });

      // One study in the viewer (the default mode's route).
      t0 = Date.now();
      await page.goto(`${cfg.origin}/viewer/viewer?StudyInstanceUIDs=${cfg.study}`,
                      { waitUntil: 'domcontentloaded' });
      try {
        await page.waitForFunction(
          `(() => { const s = (${canvasStats.toString()})(); return !!s && s.distinct >= 16; })()`,
          { timeout, polling: 500 });
        r.imageOk = true;
      } catch (e) {
        r.imageOk = false;
      }
      r.imageMs = Date.now() - t0;
      if (vp.mobile) {
        // On a phone OHIF 3.13 opens its series panel beside a viewport of
        // about 65 px: do as a user would, skip the first-visit tour and tap
        // the panel's collapse icon, and wait for the image at the new size.
        r.narrowCanvas = await page.evaluate(canvasStats);
        await page.evaluate(() => {
          const b = [...document.querySelectorAll('button,a')].find(x => /skip all/i.test(x.innerText));
          if (b) b.click();
        });
        await new Promise(res => setTimeout(res, 500));
        const left = await page.$('[data-cy="side-panel-header-left"]');
        const box = left && await left.boundingBox();
        if (box) {
          await page.touchscreen.tap(box.x + box.width / 2, box.y + box.height / 2);
          r.collapsedSeriesPanel = true;
          r.imageOk = r.imageOk && await page.waitForFunction(
            `(() => { const s = (${canvasStats.toString()})(); return !!s && s.width > 200 && s.distinct >= 16; })()`,
            { timeout: 15000, polling: 500 }).then(() => true, () => false);
        }
      }
      await new Promise(res => setTimeout(res, 1500)); // let thumbnails settle for the picture
      r.canvas = await page.evaluate(canvasStats);
      r.viewerText = (await page.evaluate(() => document.body.innerText)).slice(0, 2000);
      r.imageShot = path.join(cfg.outDir, `viewer-${vp.name}-image.png`);
      await page.screenshot({ path: r.imageShot });
      await page.close();
      out.viewports.push(r);
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch(e => {
  console.log(JSON.stringify({ error: String(e && e.stack || e) }));
  process.exit(1);
});
