// Opens `ingestctl console` in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) and waits until the page shows two events the test sends while it watches:
//
//     node console.js --url http://127.0.0.1:8090/ --valid ID --invalid ID --pointer /properties/price --screenshot OUT.png
//
// Prints "ready" once the page is open and live (the test then sends the events, with curl),
// then, once the valid event's row and the invalid event's error beside the field POINTER are
// in the DOM, one JSON object: {"valid": row text, "invalid": row text, "error": the error's
// text, "line": the text of the line the error stands on}; and keeps a screenshot of the page in
// OUT.png. Exits non-zero if that does not happen within 60 s or the page logs an error.
'use strict'

const { chromium } = require('playwright-core')
const { parseArgs } = require('./cli')

const CHROMIUM = process.env.COMPAT_CHROMIUM || '/usr/bin/chromium'

async function main() {
  const args = parseArgs(process.argv.slice(2), 'console.js', ['url', 'valid', 'invalid', 'pointer', 'screenshot'])
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    chromiumSandbox: false,
    timeout: 30000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  })
  const deadline = setTimeout(() => {
    console.error('console.js: the events did not appear within 60 s')
    browser.close().finally(() => process.exit(2))
  }, 60000)
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } })
    const errors = []
    page.on('pageerror', (e) => errors.push(String(e)))
    await page.goto(args.url)
    await page.waitForFunction(() => document.getElementById('status').textContent === 'live', null, { timeout: 30000 })
    console.log('ready')
    const valid = await page.waitForSelector(`.item[data-message-id="${args.valid}"]`, { timeout: 55000 })
    const error = await page.waitForSelector(
      `.item[data-message-id="${args.invalid}"] .field-error[data-pointer="${args.pointer}"]`, { timeout: 55000 })
    // Let the sparklines and the queue table catch up for the screenshot.
    await page.waitForTimeout(2500)
    const invalidRow = await page.$(`.item[data-message-id="${args.invalid}"]`)
    const line = await error.evaluate((el) => {
      // The text of the line the error stands on: back to the previous newline.
      let text = el.textContent
      for (let node = el.previousSibling; node; node = node.previousSibling) {
        const t = node.textContent
        const cut = t.lastIndexOf('\n')
        if (cut >= 0) { text = t.slice(cut + 1) + text; break }
        text = t + text
      }
      return text
    })
    await page.screenshot({ path: args.screenshot, fullPage: true })
    if (errors.length) throw new Error('the page logged errors: ' + errors.join('; '))
    console.log(JSON.stringify({
      valid: (await valid.textContent()).split('\n')[0],
      invalid: (await invalidRow.textContent()).split('\n')[0],
      error: await error.textContent(),
      line,
    }))
  } finally {
    clearTimeout(deadline)
    await browser.close()
  }
}

main().catch((e) => { console.error(e); process.exit(1) })
