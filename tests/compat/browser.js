// Sends a fixed set of calls to a collector with a published browser SDK, unmodified, running
// in a real headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core).
//
//     node browser.js --sdk MODE --url http://127.0.0.1:8080 --write-key KEY --marker RUN
//
// MODE is one of:
//   segment-default   @segment/analytics-next, one request per event (POST <url>/v1/t, /v1/i, ...)
//   segment-batching  the same, deliveryStrategy batching (POST <url>/v1/b, 3 events at most each)
//   segment-unload    batching that sends nothing until the page is left; the driver then
//                     navigates away and the SDK flushes with a keepalive fetch on pagehide
//   rudder-xhr        @rudderstack/analytics-js v3, its default XHR transport (POST <url>/v1/track, ...)
//   rudder-beacon     the same with useBeacon: navigator.sendBeacon(<url>/beacon/v1/batch?writeKey=KEY),
//                     sent when the page is left (the driver navigates away)
//
// The page is served by a small HTTP server in this script, on 127.0.0.1 and a port of its own
// (a different origin from the collector, so CORS applies as on a real site), with the SDK's
// browser bundle taken from node_modules; nothing is fetched from the SDK vendor's servers (the
// settings they would serve are given inline), and any request to another origin fails the run.
//
// Every call carries the run marker (in properties or traits, in context for alias). A browser
// SDK keeps the user's identity itself, so the calls come in a browser's order: an anonymous
// track and page (the SDK's own anonymousId), identify, then track, group and alias as that
// user. The SDK makes up each messageId and returns it with the event; the ids are printed to
// stdout as one JSON list once every one of them has been seen in a request body that the
// collector answered 2xx (watched at the network layer, so this holds after the page is gone).
// Exits non-zero if the SDK reports any failure, any request to the collector (CORS preflights
// included) fails or gets another status, the page logs an error, or this does not finish
// within 60 s.
//
// The requests to the collector are watched through the DevTools Fetch domain (paused and let
// go unchanged), which also sees those the browser sends for a page that is being left.
// COMPAT_VERBOSE=1 logs each of them, with its headers, to stderr; COMPAT_CHROMIUM names
// another Chromium binary than /usr/bin/chromium.
'use strict'

const fs = require('fs')
const http = require('http')
const path = require('path')
const { chromium } = require('playwright-core')
const { parseArgs: cliArgs } = require('./cli')

const MODES = ['segment-default', 'segment-batching', 'segment-unload', 'rudder-xhr', 'rudder-beacon']
const DEADLINE_MS = 60000
const CHROMIUM = process.env.COMPAT_CHROMIUM || '/usr/bin/chromium'

// The browser while one is open, for closing it after a timeout.
let openBrowser

const SEGMENT_DIR = path.dirname(require.resolve('@segment/analytics-next/package.json'))
const SEGMENT_UMD = path.join(SEGMENT_DIR, 'dist/umd')
const RUDDER_DIR = path.join(__dirname, 'node_modules/@rudderstack/analytics-js')
// The build with every plugin inside it: the others load plugins from RudderStack's CDN.
const RUDDER_BUNDLE = path.join(RUDDER_DIR, 'dist/npm/modern/bundled/umd/index.js')

function parseArgs(argv) {
  const args = cliArgs(argv, 'browser.js', ['sdk', 'url', 'write-key', 'marker'])
  if (!MODES.includes(args.sdk)) throw new Error(`unknown --sdk ${args.sdk}: one of ${MODES.join('|')}`)
  return args
}

// ---------------------------------------------------------------------------------------------
// The page's own server.

function pageHtml(mode) {
  const segment = mode.startsWith('segment')
  // analytics-next's browser bundle loads its optional chunks from <cdn>/analytics-next/bundles/,
  // <cdn> being window.analytics._cdn when set: point it at this server, not cdn.segment.com.
  const scripts = segment
    ? '<script>window.analytics = { _cdn: location.origin }</script>\n' +
      '<script src="/analytics-next/bundles/index.js"></script>'
    : '<script src="/rudder/index.js"></script>'
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>compat ${mode}</title>
<link rel="icon" href="data:,">
${scripts}
</head><body><h1>compat ${mode}</h1></body></html>
`
}

const BYE_HTML = '<!doctype html><html><head><meta charset="utf-8"><title>bye</title><link rel="icon" href="data:,"></head><body>left</body></html>\n'

// Serves the page, the SDK bundles and a page to leave to. Resolves with { server, origin }.
function startPageServer(mode, problems, log) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost')
    log(`page server: ${req.method} ${url.pathname}`)
    const send = (status, type, body) => {
      res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' })
      res.end(body)
    }
    const sendFile = (file) => {
      fs.readFile(file, (err, data) => {
        if (err) {
          problems.push(`the page server cannot read ${file}: ${err.message}`)
          send(404, 'text/plain', 'not found')
        } else {
          send(200, 'application/javascript; charset=utf-8', data)
        }
      })
    }
    if (req.method !== 'GET') {
      problems.push(`the page sent ${req.method} ${url.pathname} to its own origin`)
      return send(405, 'text/plain', 'method not allowed')
    }
    if (url.pathname === '/') return send(200, 'text/html; charset=utf-8', pageHtml(mode))
    if (url.pathname === '/bye') return send(200, 'text/html; charset=utf-8', BYE_HTML)
    const segment = url.pathname.match(/^\/analytics-next\/bundles\/([A-Za-z0-9._-]+\.js)$/)
    if (segment) return sendFile(path.join(SEGMENT_UMD, segment[1]))
    if (url.pathname === '/rudder/index.js') return sendFile(RUDDER_BUNDLE)
    problems.push(`the page asked its own origin for ${url.pathname}, which is not served`)
    return send(404, 'text/plain', 'not found')
  })
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      resolve({ server, origin: `http://127.0.0.1:${server.address().port}` })
    })
  })
}

// ---------------------------------------------------------------------------------------------
// What runs in the page (serialized by playwright: no closure over this file's variables).

// @segment/analytics-next. Resolves with { ids, errors, anonymousId }.
async function segmentInPage({ writeKey, apiHost, protocol, marker, deliveryStrategy }) {
  const errors = []
  const userId = `user-${marker}`
  // What cdn.segment.com/v1/projects/<writeKey>/settings would serve for a source with no
  // destinations, given inline (remote metrics off: they would post <apiHost>/m).
  const cdnSettings = {
    integrations: {
      'Segment.io': {
        apiKey: writeKey,
        apiHost,
        protocol,
        unbundledIntegrations: [],
        addBundledMetadata: true,
        maybeBundledConfigIds: {},
      },
    },
    plan: {},
    edgeFunction: {},
    analyticsNextEnabled: true,
    middlewareSettings: {},
    enabledMiddleware: {},
    metrics: { sampleRate: 0 },
    legacyVideoPluginsEnabled: false,
    remotePlugins: [],
  }
  const segmentio = { apiHost, protocol }
  if (deliveryStrategy) segmentio.deliveryStrategy = deliveryStrategy
  const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load(
    { writeKey, cdnSettings, cdnURL: location.origin },
    { integrations: { 'Segment.io': segmentio } },
  )
  analytics.on('error', (e) => {
    const id = e && e.ctx && e.ctx.event ? e.ctx.event.messageId : '?'
    errors.push(`SDK error ${e && e.code} for ${id}: ${e && e.reason}`)
  })
  const anonymousId = analytics.user().anonymousId()

  const calls = [
    ['track', () => analytics.track('Application Opened', { compat_run: marker, from_background: true })],
    ['page', () => analytics.page('Home', { compat_run: marker, path: '/' })],
    ['identify', () => analytics.identify(userId, { compat_run: marker, plan: 'plus' })],
    ['track', () => analytics.track('Application Opened', { compat_run: marker, from_background: false })],
    ['group', () => analytics.group(`group-${marker}`, { compat_run: marker, name: 'Acme' })],
    ['alias', () => analytics.alias(userId, anonymousId, { context: { compat_run: marker } })],
  ]
  const ids = []
  for (const [method, call] of calls) {
    const ctx = await call()
    const id = ctx && ctx.event ? ctx.event.messageId : undefined
    if (!id) errors.push(`${method}: the SDK returned no messageId`)
    const failed = ctx && typeof ctx.failedDelivery === 'function' ? ctx.failedDelivery() : undefined
    if (failed) errors.push(`${method} ${id}: the SDK reports a failed delivery: ${failed.reason}`)
    ids.push(id)
  }
  return { ids, errors, anonymousId }
}

// @rudderstack/analytics-js v3. Resolves with { ids, errors, anonymousId }.
async function rudderInPage({ writeKey, dataPlaneUrl, marker, useBeacon }) {
  const errors = []
  const userId = `user-${marker}`
  // What the config backend (api.rudderstack.com/sourceConfig) would answer for a source with
  // no destinations, given inline through the getSourceConfig load option.
  const sourceConfig = {
    source: {
      id: 'compat-source',
      name: 'compat',
      writeKey,
      workspaceId: 'compat-workspace',
      enabled: true,
      config: {
        statsCollection: { errors: { enabled: false }, metrics: { enabled: false } },
      },
      destinations: [],
    },
  }
  const analytics = new window.rudderanalytics.RudderAnalytics()
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the RudderStack SDK did not get ready within 20 s')), 20000)
    const options = { getSourceConfig: () => sourceConfig, logLevel: 'WARN' }
    if (useBeacon) options.useBeacon = true
    analytics.load(writeKey, dataPlaneUrl, options)
    analytics.ready(() => {
      clearTimeout(timer)
      resolve()
    })
  })
  const anonymousId = analytics.getAnonymousId()

  // Each call's callback gets the event as queued for the data plane.
  const calls = [
    ['track', (cb) => analytics.track('Application Opened', { compat_run: marker, from_background: true }, cb)],
    ['page', (cb) => analytics.page('Home', { compat_run: marker, path: '/' }, cb)],
    ['identify', (cb) => analytics.identify(userId, { compat_run: marker, plan: 'plus' }, cb)],
    ['track', (cb) => analytics.track('Application Opened', { compat_run: marker, from_background: false }, cb)],
    ['group', (cb) => analytics.group(`group-${marker}`, { compat_run: marker, name: 'Acme' }, cb)],
    ['alias', (cb) => analytics.alias(userId, anonymousId, { context: { compat_run: marker } }, cb)],
  ]
  const ids = []
  for (const [method, call] of calls) {
    const event = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(undefined), 10000)
      call((e) => {
        clearTimeout(timer)
        resolve(e)
      })
    })
    const id = event ? event.messageId : undefined
    if (!id) errors.push(`${method}: the SDK gave its callback no messageId`)
    ids.push(id)
  }
  return { ids, errors, anonymousId }
}

// ---------------------------------------------------------------------------------------------
// Watching the network.

// The messageIds in a request body the SDKs send: one event, or { batch: [events] }.
function messageIdsIn(text) {
  let body
  try {
    body = JSON.parse(text)
  } catch (e) {
    return { ids: [], error: `a body that is not JSON: ${String(text).slice(0, 200)}` }
  }
  const events = body && Array.isArray(body.batch) ? body.batch : [body]
  return { ids: events.map((event) => event && event.messageId).filter(Boolean) }
}

// Watches every request the page makes. Those to the collector are paused and let go unchanged
// through the DevTools Fetch domain, once before they are sent (method, URL, headers, body) and
// once with the answer (status): this sees the requests a page sends as it unloads (keepalive
// fetch, sendBeacon), which the browser finishes after the page is gone and which playwright's
// request events miss. CORS preflights show up here too. Other requests are only watched, to
// catch any that leaves for somewhere else than the page's origin and the collector.
async function watchNetwork(context, page, { pageOrigin, collectorOrigin, problems, log }) {
  const toCollector = []
  const byId = new Map()
  const waiters = []
  const notify = () => waiters.splice(0).forEach((f) => f())

  context.on('request', (request) => {
    const url = request.url()
    let origin = 'null'
    try {
      origin = new URL(url).origin
    } catch (e) {
      // not a URL with an origin
    }
    if (origin === pageOrigin || origin === collectorOrigin) return
    if (url.startsWith('data:') || url.startsWith('blob:') || url === 'about:blank') return
    problems.push(`the page tried to reach ${request.method()} ${url}: only its own origin and the collector are allowed`)
    notify()
  })

  const cdp = await context.newCDPSession(page)
  cdp.on('Fetch.requestPaused', (event) => {
    const { requestId, request } = event
    const atResponse = event.responseStatusCode !== undefined || event.responseErrorReason !== undefined
    let entry = byId.get(requestId)
    if (!entry) {
      let body = request.postData
      if (body === undefined && Array.isArray(request.postDataEntries)) {
        body = request.postDataEntries.map((e) => Buffer.from(e.bytes || '', 'base64').toString('utf8')).join('')
      }
      if (body === undefined && request.hasPostData) {
        problems.push(`cannot read the body of ${request.method} ${request.url}`)
      }
      entry = {
        method: request.method,
        url: request.url,
        headers: request.headers,
        body: body || '',
        status: undefined,
        failure: undefined,
        done: false,
      }
      byId.set(requestId, entry)
      toCollector.push(entry)
      log(`request ${entry.method} ${entry.url} ${JSON.stringify(entry.headers)} (${entry.body.length} bytes of body)`)
    }
    if (atResponse) {
      entry.status = event.responseStatusCode
      entry.failure = event.responseErrorReason
      entry.responseHeaders = event.responseHeaders
      entry.done = true
      byId.delete(requestId)
      log(`answer to ${entry.method} ${entry.url}: ${entry.status !== undefined ? entry.status : entry.failure}`)
    }
    notify()
    cdp.send('Fetch.continueRequest', { requestId }).catch((e) => {
      // The browser may be closing; a request that really got stuck shows up as unanswered.
      log(`could not let ${entry.method} ${entry.url} go on: ${e.message}`)
    })
  })
  const pattern = `${collectorOrigin}/*`
  await cdp.send('Fetch.enable', {
    patterns: [
      { urlPattern: pattern, requestStage: 'Request' },
      { urlPattern: pattern, requestStage: 'Response' },
    ],
  })

  return {
    toCollector,
    // Resolves at the next change.
    changed: () => new Promise((resolve) => waiters.push(resolve)),
  }
}

// ---------------------------------------------------------------------------------------------

async function run(args, deadline) {
  const mode = args.sdk
  const collector = new URL(args.url)
  const collectorOrigin = collector.origin
  const problems = []
  const verbose = Boolean(process.env.COMPAT_VERBOSE)
  const log = (line) => {
    if (verbose) console.error(`[browser.js] ${line}`)
  }

  let pageServer
  let browser
  let net
  // Rejects once the run's deadline has passed, naming the step and what the collector got.
  const inTime = (promise, step) => {
    let timer
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => {
        const seen = net ? net.toCollector.map((e) => `${e.method} ${e.url} -> ${e.status || e.failure || 'no answer yet'}`) : []
        reject(
          new Error(
            `${step} did not finish within ${DEADLINE_MS / 1000} s of the start; ` +
              `requests to the collector so far: ${JSON.stringify(seen)}; problems so far: ${JSON.stringify(problems)}`,
          ),
        )
      }, Math.max(0, deadline - Date.now()))
    })
    return Promise.race([promise, late]).finally(() => clearTimeout(timer))
  }
  try {
    pageServer = await startPageServer(mode, problems, log)
    const pageOrigin = pageServer.origin
    log(`page origin ${pageOrigin}, collector ${collectorOrigin}`)

    // Only the collector and this page's server are reachable by name; IP literals are
    // checked by watchNetwork.
    const hosts = ['localhost', '127.0.0.1', collector.hostname]
    browser = openBrowser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      chromiumSandbox: false,
      timeout: 30000,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-dev-shm-usage',
        `--host-resolver-rules=MAP * ~NOTFOUND, ${hosts.map((h) => `EXCLUDE ${h}`).join(', ')}`,
      ],
    })
    const context = await browser.newContext()
    const page = await context.newPage()
    net = await watchNetwork(context, page, { pageOrigin, collectorOrigin, problems, log })
    let printed = 0
    page.on('console', (message) => {
      const type = message.type()
      const line = `[page console.${type}] ${message.text()}`
      if (type === 'error') problems.push(line)
      if (type === 'error' || type === 'warning' || verbose) {
        printed += 1
        if (printed <= 20 || verbose) console.error(line)
        else if (printed === 21) console.error('[browser.js] (more console messages from the page left out)')
      }
    })
    page.on('pageerror', (error) => {
      problems.push(`[page error] ${error && error.stack ? error.stack : error}`)
    })

    await inTime(page.goto(`${pageOrigin}/`, { waitUntil: 'load', timeout: 30000 }), 'loading the page')

    let result
    const writeKey = args['write-key']
    const marker = args.marker
    if (mode.startsWith('segment')) {
      const base = `${collector.host}${collector.pathname.replace(/\/+$/, '')}`
      const strategies = {
        'segment-default': undefined,
        'segment-batching': { strategy: 'batching', config: { size: 3, timeout: 200 } },
        // Nothing is sent until the page is left: more events than we make, and a long wait.
        'segment-unload': { strategy: 'batching', config: { size: 100, timeout: 600000 } },
      }
      result = await inTime(page.evaluate(segmentInPage, {
        writeKey,
        apiHost: `${base}/v1`,
        protocol: collector.protocol.replace(':', ''),
        marker,
        deliveryStrategy: strategies[mode],
      }), 'the SDK calls')
    } else {
      result = await inTime(page.evaluate(rudderInPage, {
        writeKey,
        dataPlaneUrl: args.url,
        marker,
        useBeacon: mode === 'rudder-beacon',
      }), 'the SDK calls')
    }
    log(`the SDK returned messageIds ${JSON.stringify(result.ids)} (anonymousId ${result.anonymousId})`)
    problems.push(...result.errors)
    const ids = result.ids

    if (mode === 'segment-unload' || mode === 'rudder-beacon') {
      // Give a timer-driven send the chance to show up, then leave the page: the SDK sends
      // what it holds on pagehide / visibilitychange (keepalive fetch, or sendBeacon).
      await new Promise((resolve) => setTimeout(resolve, 500))
      const early = net.toCollector.length
      if (early) problems.push(`${early} request(s) reached the collector before the page was left`)
      log('leaving the page')
      await inTime(page.goto(`${pageOrigin}/bye`, { waitUntil: 'load', timeout: 30000 }), 'leaving the page')
    }

    // Wait until every id is in a body the collector answered 2xx, or something failed.
    const settled = () => {
      const delivered = new Set()
      let pending = 0
      for (const entry of net.toCollector) {
        if (!entry.done) {
          pending += 1
          continue
        }
        if (entry.method !== 'POST' || entry.failure || !(entry.status >= 200 && entry.status < 300)) continue
        for (const id of messageIdsIn(entry.body).ids) delivered.add(id)
      }
      return { delivered, pending }
    }
    const failedRequests = () =>
      net.toCollector.filter(
        (entry) => entry.done && (entry.failure || !(entry.status >= 200 && entry.status < 300)),
      )
    // Once the page is gone nothing more will be sent after a quiet while: a request the
    // browser refused (say, after a CORS preflight that does not allow its headers) leaves no
    // other trace.
    const leftPage = mode === 'segment-unload' || mode === 'rudder-beacon'
    const QUIET_MS = 5000
    let lastCount = -1
    let lastChange = Date.now()
    let quiet = false
    for (;;) {
      const { delivered, pending } = settled()
      if (ids.every((id) => id && delivered.has(id)) && pending === 0) break
      if (failedRequests().length || problems.length) break
      const count = net.toCollector.filter((e) => e.done).length
      if (count !== lastCount || pending) {
        lastCount = count
        lastChange = Date.now()
      } else if (leftPage && Date.now() - lastChange >= QUIET_MS) {
        quiet = true
        break
      }
      const left = deadline - Date.now()
      if (left <= 0) break
      await Promise.race([net.changed(), new Promise((resolve) => setTimeout(resolve, Math.min(left, 500)))])
    }

    // Report.
    for (const entry of failedRequests()) {
      const what = entry.failure ? `failed (${entry.failure})` : `was answered ${entry.status}`
      const preflight = entry.method === 'OPTIONS' ? ' (the CORS preflight)' : ''
      problems.push(`${entry.method} ${entry.url}${preflight} ${what}; its body: ${entry.body.slice(0, 500)}`)
    }
    for (const entry of net.toCollector.filter((e) => e.method === 'POST')) {
      const parsed = messageIdsIn(entry.body)
      if (parsed.error) problems.push(`${entry.method} ${entry.url} carried ${parsed.error}`)
      for (const id of parsed.ids) {
        if (!ids.includes(id)) problems.push(`${entry.url} carried messageId ${id}, which no call returned`)
      }
    }
    const { delivered } = settled()
    const missing = ids.filter((id) => !id || !delivered.has(id))
    if (missing.length) {
      const seen = net.toCollector.map((e) => {
        const answer = `${e.status || e.failure || 'no answer yet'}`
        const allowed = (e.responseHeaders || [])
          .filter((h) => /^access-control-/i.test(h.name))
          .map((h) => `${h.name}: ${h.value}`)
        return `${e.method} ${e.url} -> ${answer}${allowed.length ? ` (${allowed.join('; ')})` : ''}`
      })
      let when = 'before the first failure'
      if (quiet) when = `within ${QUIET_MS / 1000} s of the last request after the page was left`
      else if (Date.now() >= deadline) when = `within ${DEADLINE_MS / 1000} s`
      problems.push(
        `${missing.length} of the ${ids.length} messageIds were not seen in a body the collector answered 2xx ` +
          `${when}: ${JSON.stringify(missing)}; requests seen: ${JSON.stringify(seen)}`,
      )
    }
    return { ids, problems }
  } finally {
    if (browser) await browser.close().catch(() => {})
    openBrowser = undefined
    if (pageServer) {
      pageServer.server.closeAllConnections()
      await new Promise((resolve) => pageServer.server.close(resolve))
    }
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
  const deadline = Date.now() + DEADLINE_MS
  let timer
  const timeout = new Promise((_, reject) => {
    // A little after the deadline the wait loop keeps, for a hang anywhere else.
    timer = setTimeout(
      () => reject(new Error(`browser.js --sdk ${args.sdk} did not finish within ${DEADLINE_MS / 1000 + 10} s`)),
      DEADLINE_MS + 10000,
    )
  })
  let outcome
  try {
    outcome = await Promise.race([run(args, deadline), timeout])
  } finally {
    clearTimeout(timer)
  }
  for (const problem of outcome.problems) console.error(problem)
  console.log(JSON.stringify(outcome.ids))
  return outcome.problems.length ? 1 : 0
}

main().then(
  (code) => {
    process.exitCode = code
  },
  async (error) => {
    console.error(error && error.stack ? error.stack : error)
    process.exitCode = 1
    // After a timeout the run may still hold the browser: close it (which also removes its
    // profile), and exit whatever is left pending.
    setTimeout(() => process.exit(1), 10000).unref()
    if (openBrowser) await openBrowser.close().catch(() => {})
    process.exit(1)
  },
)
